"""Mutation testing of bnfold's core with mutmut, shard by shard: ``python bench/mutation.py``.

A benchmark job, not a test: it takes hours on 2 cores and CI never runs it. mutmut 3.8.1
(``pip install -e '.[bench]'``; configured in pyproject.toml's ``[tool.mutmut]``) makes
every mutant; this script decides which of them to run, runs mutmut on them in a copy of
the repository, and writes the report with a verdict for every survivor:

- ``bench/results/mutation.md`` and ``mutation.json``: per module the mutants, killed,
  survived, timeouts and the run time, and each survivor with its one-line verdict from
  ``bench/mutation_verdicts.json`` ("killed by <test>", "equivalent: <why>", "not a
  value/decision: <why>", or "open: <why>"); a survivor with no verdict is listed as such.

Which mutants run:

- mutants that only change the text of a message (the detail of a ``NoMatch``, the
  message of an ``InputError``/``ValueError``, a crossing's ``_refuse`` words, the
  arguments of plan's checks that only name things in their refusal) are counted and not
  run: the issue's "Done when" excludes message text, and they are a tenth of all;
- mutants in a statement that no selected test executes (``coverage``, measured once per test
  selection on the unmutated copy) are not run either: they cannot change any outcome,
  so each is a survivor and listed with a verdict (a test to add, or why not);
- the rest run, each against the tests that reach its function (mutmut's own stats),
  fastest first, stopping at the first failure. ``--sample N`` runs a deterministic
  sample of N per shard instead (the report then says "sampled").

Each shard mutates some modules and runs them against one test selection: fast,
deterministic tests (unit, pattern, route, merge, legality, regression, promise and
verify-compare tests; never the random fuzzers, the corpus, the zoo, training, large
models or start-up timings). A selection's copy lives in ``bench/work-mutation/<name>``
(its own ``mutants/`` and mutmut stats); a rerun resumes where the last stopped, and
re-tests the mutants of functions whose source changed. Changing a selection's test list
makes mutmut reset every result of its copy (the script says so before it runs). Tests
that start ``python -m bnfold`` in a subprocess run the unmutated copy (mutmut swaps
functions inside the test process only), so they never kill a mutant: kills come from
in-process tests.

    python bench/mutation.py                         # every shard (resumes)
    python bench/mutation.py --shard affine --shard compare
    python bench/mutation.py --shard plan --sample 300
    python bench/mutation.py --rerun-survivors       # after adding tests
    python bench/mutation.py --rerun-unexplained     # skip survivors explained as equivalent
    python bench/mutation.py --report-only --check-kills
"""

from __future__ import annotations

import argparse
import datetime as dt
import fnmatch
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORK = BENCH / "work-mutation"
RESULTS = BENCH / "results"
VERDICTS = BENCH / "mutation_verdicts.json"
MUTMUT_VERSION = "3.8.1"

#: Test selections (see the module docstring): fast and deterministic; hypothesis runs its
#: "mutation" profile (tests/conftest.py: derandomized, no example database).
SELECTIONS = {
    "fold": ["tests/test_affine.py", "tests/test_patterns.py", "tests/test_routes.py", "tests/test_merge.py",
             "tests/test_legality.py", "tests/test_regressions.py", "tests/test_fuzz_regressions.py",
             "tests/test_promises.py", "tests/test_fold.py", "tests/test_numerics.py", "tests/test_consumers.py",
             "tests/test_plan.py"],
    "verify": ["tests/test_verify.py", "tests/test_verify_axes.py", "tests/test_verify_noise.py",
               "tests/test_verify_edges.py", "tests/test_verify_features.py", "tests/test_verify_mapped.py",
               "tests/test_verify_precision.py", "tests/test_promises.py"],
    "recalibrate": ["tests/test_recalibrate.py"],
}
SELECTIONS["write"] = SELECTIONS["fold"] + ["tests/test_lossless.py", "tests/test_wire.py", "tests/test_io.py",
                                            "tests/test_inspect.py"]


@dataclass(frozen=True)
class Shard:
    name: str
    files: tuple[str, ...]  # globs under the repository
    selection: str
    #: In the issue's "Done when": every value/decision mutant killed or explained.
    done_when: bool


SHARDS = [
    Shard("affine", ("bnfold/affine.py",), "fold", True),
    Shard("compare", ("bnfold/verification/compare.py",), "verify", True),
    Shard("patterns", tuple(f"bnfold/patterns/{m}.py" for m in ("__init__", "consumer", "conv", "conv_transpose",
                                                                  "elementwise", "gemm", "layout", "matmul",
                                                                  "shapes")), "fold", True),
    Shard("crossing", ("bnfold/patterns/crossing.py",), "fold", True),
    Shard("standard", ("bnfold/standard.py",), "fold", True),
    # verify's channel-axis walk: verify's tests reach it, fold's do not.
    Shard("channels", ("bnfold/patterns/channels.py",), "verify", True),
    Shard("route", ("bnfold/route.py",), "fold", True),
    Shard("plan", ("bnfold/plan.py",), "fold", True),
    Shard("merge", ("bnfold/merge.py",), "fold", True),
    Shard("rewrite", ("bnfold/rewrite.py",), "write", False),
    Shard("writer", ("bnfold/writer.py",), "write", False),
    Shard("recalibration", ("bnfold/recalibration.py",), "recalibrate", False),
]

#: Message-building calls, and the first argument index that is message text.
MESSAGE_ARGS = {"InputError": 0, "ValueError": 0, "IndexError": 0, "TypeError": 0, "RuntimeError": 0,
                "NoMatch": 1}
#: Calls whose arguments at these indices only name things in a message: a Keep's detail
#: (not its channels or conversion); plan's ``_cast(values, dtype, what, node)``,
#: ``_finite(values, node, role)`` (merge's ``_finite(values, node)`` too),
#: ``_require_nonempty(weight, scale, node)`` and ``_require_weight_fits(node, weight,
#: factor, measure)``; crossing's ``_known(node, channel)`` and ``_require_axis_1(node, channel)``.
MESSAGE_PARAMS = {"Keep": frozenset({2}), "_cast": frozenset({2, 3}), "_finite": frozenset({1, 2}),
                  "_require_nonempty": frozenset({2}), "_require_weight_fits": frozenset({0}), "_known": frozenset({0}),
                  "_require_axis_1": frozenset({0})}
MESSAGE_KEYWORDS = {"detail", "what"}
#: Calls whose trailing message argument may be left out (NoMatch's detail has a default,
#: an exception takes no argument at all).
OPTIONAL_MESSAGE = {"InputError", "ValueError", "IndexError", "TypeError", "RuntimeError", "NoMatch"}

#: README/docs claims left without a unit test, and why (issue 27's last item).
UNTESTED_CLAIMS = [
    ("Performance tables and ratios, `--help` in 0.12 s, peak-RSS figures, '32 models take 0.06x the time', "
     "recalibrate's 'at most one copy on disk'",
     "measured in bench/ (bench/run.py, startup.py, batch.py, recalibrate.py), not in unit tests, by project rule"),
    ("CUDA: `use_tf32=0` reaching onnxruntime, `preload_dlls`, provider fall-back",
     "needs a GPU: the cuda-marked tests skip here (bench/gpu_check.sh runs them on a GPU machine)"),
    ("README's two set-up commands on a fresh machine; Python >= 3.10",
     "CI's job, not a test's (.ci/run on a clean clone; CI runs 3.11 only)"),
    ("`--embed` refused just under 2 GiB (the 64 MiB headroom band)",
     "testing the band needs about 2 GB actually written; the refusal above 2 GiB is tested"),
    ("recalibrate at opset 6 (the is_test=1 conversion)", "no opset-6 model with running statistics to recalibrate "
     "is built here (onnxruntime runs no BatchNormalization-6 in training form)"),
    ("The model zoo's accuracies (README, docs/models.md)", "figures that come from training runs, not from bnfold"),
]


# --------------------------------------------------------------------------- mutants


@dataclass
class Mutant:
    """One mutant, named as mutmut names it, with what it changes and where."""

    name: str
    ident: str  # stable across unrelated edits: file, function, node and mutation, occurrence
    file: str
    function: str
    line: int
    change: str
    message_only: bool
    #: First line of the statement holding ``line``: what coverage reports as executed.
    statement: int = 0
    status: str = "not run"
    verdict: str = ""
    check: str = ""


def _callee(call) -> str | None:
    import libcst as cst

    func = call.func
    if isinstance(func, cst.Name):
        return func.value
    if isinstance(func, cst.Attribute):
        return func.attr.value
    return None


def _message_first(name: str | None, args) -> int | frozenset[int] | None:
    """The first argument of a call to ``name`` that is message text, or the set of such
    arguments (None: no message call)."""
    # crossing._refuse(node, what, reason): its reason is a decision; elementwise._refuse(detail)
    if name == "_refuse":
        return frozenset({0}) if len(args) == 1 else frozenset({0, 1})
    return MESSAGE_ARGS.get(name, MESSAGE_PARAMS.get(name))


def _is_message_arg(call, index: int) -> bool:
    name, args = _callee(call), call.args
    first = _message_first(name, args)
    if first is None:
        return False
    arg = args[index]
    if arg.keyword is not None:
        return arg.keyword.value in MESSAGE_KEYWORDS
    return index in first if isinstance(first, frozenset) else index >= first


def _message_only(mutation, parents) -> bool:
    """Whether a mutation changes message text only: inside a message argument, or a
    message call that loses or changes only its message arguments."""
    import libcst as cst

    node = mutation.original_node
    if isinstance(node, cst.Call) and _message_first(_callee(node), node.args) is not None:
        old, new = node.args, mutation.mutated_node.args
        if len(old) == len(new):
            changed = [i for i, (a, b) in enumerate(zip(old, new)) if not a.deep_equals(b)]
            return bool(changed) and all(_is_message_arg(node, i) for i in changed)
        if len(new) == len(old) - 1:
            removed = next((i for i in range(len(new)) if not old[i].deep_equals(new[i])), len(new))
            # only a message argument the callee can do without may go (a required one: TypeError)
            return _is_message_arg(node, removed) and removed == len(old) - 1 and _callee(node) in OPTIONAL_MESSAGE
        return False
    child, parent = node, parents.get(node)
    while parent is not None and not isinstance(parent, (cst.FunctionDef, cst.Module)):
        if isinstance(parent, cst.Call):
            index = next((i for i, a in enumerate(parent.args) if a is child), None)
            if index is not None and _message_first(_callee(parent), parent.args) is not None:
                return _is_message_arg(parent, index)
        child, parent = parent, parents.get(parent)
    return False


def _short_change(before: str, after: str, context: int = 18) -> str:
    """``before -> after`` trimmed to the part that differs, with a little context."""
    before, after = " ".join(before.split()), " ".join(after.split())
    if len(before) <= 70 and len(after) <= 70:
        return f"{before} -> {after}"
    start = 0
    while start < min(len(before), len(after)) and before[start] == after[start]:
        start += 1
    end = 0
    while end < min(len(before), len(after)) - start and before[-1 - end] == after[-1 - end]:
        end += 1
    lo = max(0, start - context)
    b, a = before[lo:len(before) - max(0, end - context)], after[lo:len(after) - max(0, end - context)]
    prefix = "..." if lo else ""
    suffix = "..." if end > context else ""
    return f"{prefix}{b}{suffix} -> {prefix}{a}{suffix}"


def mutants_of(root: Path, relative: str) -> list[Mutant]:
    """Every mutant mutmut makes of ``relative`` (its own generator and numbering)."""
    import libcst as cst
    from coverage.parser import PythonParser
    from libcst.metadata import MetadataWrapper, ParentNodeProvider, PositionProvider
    from mutmut.mutation.file_mutation import MutationVisitor, group_by_top_level_node
    from mutmut.mutation.mutators import mutation_operators
    from mutmut.mutation.pragma_handling import get_ignored_lines
    from mutmut.mutation.trampoline_templates import mangle_function_name
    from mutmut.utils.format_utils import get_mutant_name

    code = (root / relative).read_text()
    wrapper = MetadataWrapper(cst.parse_module(code))
    cwd = os.getcwd()
    os.chdir(root)  # mutmut reads [tool.mutmut] (do_not_mutate_patterns) from the working directory
    try:
        visitor = MutationVisitor(mutation_operators, get_ignored_lines(relative, code, wrapper, None), None)
        wrapper.visit(visitor)
    finally:
        os.chdir(cwd)
    parents = wrapper.resolve(ParentNodeProvider)
    positions = wrapper.resolve(PositionProvider)
    module = wrapper.module
    statements = PythonParser(text=code, filename=relative)
    statements.parse_source()
    found: list[Mutant] = []
    seen: dict[tuple, int] = {}
    for function, mutations in group_by_top_level_node(visitor.mutations).items():
        if not isinstance(function, cst.FunctionDef):
            continue  # class-level statements: mutmut makes no trampoline for them
        owner, parent = None, parents.get(function)
        while parent is not None and not isinstance(parent, cst.Module):
            if isinstance(parent, cst.ClassDef):
                owner = parent.name.value
                break
            parent = parents.get(parent)
        mangled = mangle_function_name(name=function.name.value, class_name=owner) + "__mutmut"
        label = f"{owner}.{function.name.value}" if owner else function.name.value
        for i, mutation in enumerate(mutations):
            before = module.code_for_node(mutation.original_node)
            after = module.code_for_node(mutation.mutated_node)
            key = (relative, label, before, after)
            occurrence = seen.get(key, 0)
            seen[key] = occurrence + 1
            ident = hashlib.sha1(repr((*key, occurrence)).encode()).hexdigest()[:10]
            found.append(Mutant(
                name=get_mutant_name(Path(relative), f"{mangled}_{i + 1}"), ident=ident, file=relative,
                function=label, line=positions[mutation.original_node].start.line,
                change=_short_change(before, after), message_only=_message_only(mutation, parents),
                statement=statements.first_line(positions[mutation.original_node].start.line)))
    return found


# --------------------------------------------------------------------------- the copy


def shard_files(shard: Shard) -> list[str]:
    return sorted(str(p.relative_to(REPO)) for pattern in shard.files for p in REPO.glob(pattern))


def selection_files(selection: str) -> list[str]:
    """Every module the shards of ``selection`` mutate: its copy's ``only_mutate``."""
    return sorted({f for shard in SHARDS if shard.selection == selection for f in shard_files(shard)})


def prepare(selection: str) -> Path:
    """The selection's copy of the repository, synced with the working tree: files whose
    content changed are copied (mutmut then re-tests the functions that changed)."""
    root = WORK / selection
    root.mkdir(parents=True, exist_ok=True)
    for top in ("bnfold", "tests", "models", "docs"):
        _sync_tree(REPO / top, root / top)
    shutil.copy2(REPO / "README.md", root / "README.md")
    files = selection_files(selection)
    tests = [t for t in SELECTIONS[selection] if (REPO / t).exists()]
    config = (REPO / "pyproject.toml").read_text()
    for key in ("only_mutate", "pytest_add_cli_args_test_selection"):
        config = re.sub(rf"(?ms)^{key} = \[.*?\]\n", "", config)
    config = config.replace("[tool.mutmut]\n", "\n".join([
        "[tool.mutmut]", "# bench/mutation.py: this selection's shards and tests",
        f"only_mutate = {json.dumps(files)}", f"pytest_add_cli_args_test_selection = {json.dumps(tests)}", ""]), 1)
    target = root / "pyproject.toml"
    if not target.exists() or target.read_text() != config:
        if target.exists() and _test_selection(target.read_text()) != _test_selection(config):
            # mutmut 3.8 fingerprints its test selection: a changed list resets every
            # result of the copy, killed ones included (all shards of the selection).
            print(f"[{selection}] the test selection changed: mutmut will reset every result of this copy "
                  "(its shards start again from scratch)", flush=True)
        target.write_text(config)
    return root


def _test_selection(config: str) -> str | None:
    found = re.search(r"(?m)^pytest_add_cli_args_test_selection = .*$", config)
    return found.group(0) if found else None


def _sync_tree(source: Path, target: Path) -> None:
    keep = set()
    for path in source.rglob("*"):
        if "__pycache__" in path.parts or path.suffix == ".pyc":
            continue
        relative = path.relative_to(source)
        keep.add(relative)
        dest = target / relative
        if path.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
        elif not dest.exists() or dest.read_bytes() != path.read_bytes():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
    if target.exists():
        for path in sorted(target.rglob("*"), reverse=True):
            if "__pycache__" not in path.parts and path.relative_to(target) not in keep:
                path.unlink() if path.is_file() else shutil.rmtree(path, ignore_errors=True)


def environment(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    # Subprocesses (python -m bnfold) import the unmutated copy: mutmut's trampolines need
    # its configuration, which a test's temporary working directory does not have.
    env["PYTHONPATH"] = str(root)
    env["HYPOTHESIS_PROFILE"] = "mutation"
    env.pop("MUTANT_UNDER_TEST", None)
    return env


def executed_lines(root: Path, selection: str, files: list[str]) -> dict[str, set[int]]:
    """Lines of ``files`` that the selection's tests execute, from one coverage run of the
    unmutated copy; cached until a source or test file changes."""
    digest = hashlib.sha1()
    for path in sorted([*(root / "bnfold").rglob("*.py"), *(root / "tests").rglob("*.py")]):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    cache = root / "executed-lines.json"
    if cache.exists():
        stored = json.loads(cache.read_text())
        if stored["digest"] == digest.hexdigest() and set(files) <= set(stored["lines"]):
            return {f: set(v) for f, v in stored["lines"].items()}
    print(f"[{selection}] measuring line coverage of the selection ...", flush=True)
    data = root / ".coverage-mutation"
    tests = [t for t in SELECTIONS[selection] if (root / t).exists()]
    started = time.monotonic()
    run = subprocess.run(["nice", "-n", "10", sys.executable, "-m", "coverage", "run", f"--data-file={data}",
                          f"--include={','.join(files)}", "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                         cwd=root, env=environment(root), capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"the selection {selection!r} fails on the unmutated copy:\n{run.stdout[-3000:]}{run.stderr[-2000:]}")
    report = root / "coverage.json"
    subprocess.run([sys.executable, "-m", "coverage", "json", f"--data-file={data}", "-o", str(report)], cwd=root,
                   check=True, capture_output=True)
    measured = json.loads(report.read_text())["files"]
    lines = {f: sorted(measured.get(f, {}).get("executed_lines", [])) for f in files}
    cache.write_text(json.dumps({"digest": digest.hexdigest(), "lines": lines,
                                 "seconds": round(time.monotonic() - started, 1)}))
    return {f: set(v) for f, v in lines.items()}


# --------------------------------------------------------------------------- running


def read_status(root: Path, files: list[str]) -> dict[str, str]:
    from mutmut.stats import status_by_exit_code

    status: dict[str, str] = {}
    for relative in files:
        meta = root / "mutants" / (relative + ".meta")
        if meta.exists():
            codes = json.loads(meta.read_text())["exit_code_by_key"]
            status.update({name: status_by_exit_code[code] for name, code in codes.items()})
    return status


def run_mutmut(root: Path, names: list[str], max_children: int, stop_after: float | None, log: Path) -> float:
    """``mutmut run`` on ``names`` (niced); SIGINT after ``stop_after`` minutes (mutmut then
    stops and keeps every result so far). Returns the wall time."""
    mutmut = Path(sys.executable).with_name("mutmut")
    command = ["nice", "-n", "10", str(mutmut), "run", "--max-children", str(max_children), *names]
    started = time.monotonic()
    with open(log, "a") as out:
        out.write(f"\n=== {dt.datetime.now().isoformat(timespec='seconds')}: {len(names)} mutants\n")
        out.flush()
        process = subprocess.Popen(command, cwd=root, env=environment(root), stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            process.wait(timeout=None if stop_after is None else stop_after * 60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return time.monotonic() - started


def run_shard(shard: Shard, root: Path, args) -> dict:
    files = shard_files(shard)
    mutants = [m for f in files for m in mutants_of(root, f)]
    lines = executed_lines(root, shard.selection, selection_files(shard.selection))
    runnable = [m for m in mutants if not m.message_only and m.statement in lines[m.file]]
    sampled = args.sample if args.sample is not None and args.sample < len(runnable) else None
    chosen = {m.ident for m in sorted(runnable, key=lambda m: m.ident)[:sampled]} if sampled else None
    lived = {"survived", "timeout"}
    wanted = {"not checked", "no tests"} | (lived if args.rerun_survivors or args.rerun_unexplained else set())
    # A survivor explained as equivalent or as no value/decision runs every test that reaches
    # it (minutes): re-test only the ones a new test should now kill.
    settled = ("equivalent", "not a value/decision")
    explained = {ident for ident, v in load_verdicts().items() if kind_of(v["verdict"]) in settled} \
        if args.rerun_unexplained else set()
    log_path = root / "mutmut.log"
    runs_path = root / "runs.json"
    done: set[str] = set()
    # A second pass picks up what mutmut reset while regenerating a changed module (the
    # statuses read before a run predate that).
    for _ in range(2):
        status = read_status(root, files)
        if done and any(m.name not in status for m in mutants):
            sys.exit(f"mutmut's mutants of {files} are not the ones this script made: is mutmut {MUTMUT_VERSION} "
                     "installed, and bnfold/ synced?")
        todo = [m for m in runnable if status.get(m.name, "not checked") in wanted and m.name not in done
                and (chosen is None or m.ident in chosen)
                and not (m.ident in explained and status.get(m.name) in lived)]
        if not todo:
            break
        print(f"[{shard.name}] running {len(todo)} of {len(mutants)} mutants "
              f"({len(runnable)} runnable{f', sample {sampled}' if sampled else ''}) ...", flush=True)
        wall = run_mutmut(root, [m.name for m in todo], args.max_children, args.stop_after, log_path)
        runs = json.loads(runs_path.read_text()) if runs_path.exists() else []
        runs.append({"shard": shard.name, "date": dt.datetime.now().isoformat(timespec="seconds"),
                     "mutants": len(todo), "wall_s": round(wall, 1), "max_children": args.max_children,
                     "load": os.getloadavg()[0]})
        runs_path.write_text(json.dumps(runs, indent=1))
        done |= {m.name for m in todo}
        wanted = {"not checked", "no tests"}
        if args.stop_after is not None:
            break
    return {"sample": sampled}


# --------------------------------------------------------------------------- report


def load_verdicts() -> dict[str, dict]:
    return json.loads(VERDICTS.read_text()) if VERDICTS.exists() else {}


def kind_of(verdict: str) -> str:
    for kind in ("killed by", "equivalent", "not a value/decision", "open"):
        if verdict.startswith(kind):
            return kind
    return "no verdict"


def check_kills(root: Path, mutants: list[Mutant]) -> None:
    """Each "killed by <tests>" verdict of a mutant mutmut has not seen killed (its test
    selection maps tests to functions once, so a new test may not be run for an old
    mutant): run those tests alone under the mutant; they must fail."""
    mutated = root / "mutants"
    _sync_tree(REPO / "tests", mutated / "tests")  # the tests named may be newer than the copy's last run
    env = environment(root)
    env["PYTHONPATH"] = str(mutated)
    for m in mutants:
        if kind_of(m.verdict) != "killed by" or m.status == "killed":
            continue
        tests = re.findall(r"tests/[\w/]+\.py::\w+", m.verdict)  # the words after each say which case
        if not tests:
            m.check = "NAMES NO TEST (tests/<file>.py::<test>)"
            continue
        run = subprocess.run(["nice", "-n", "10", sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                              "-p", "no:randomly", *tests], cwd=mutated, env={**env, "MUTANT_UNDER_TEST": m.name},
                             capture_output=True, text=True)
        outcome = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr.strip()[-200:]
        m.check = f"fails under the mutant: {outcome}" if run.returncode == 1 else \
            f"DOES NOT FAIL under the mutant (rc {run.returncode}): {outcome}"


def collect(shard: Shard, root: Path, verdicts: dict, extra: dict) -> dict:
    files = shard_files(shard)
    mutants = [m for f in files for m in mutants_of(root, f)]
    lines = executed_lines(root, shard.selection, selection_files(shard.selection))
    status = read_status(root, files)
    for m in mutants:
        if m.message_only:
            m.status = "message text"
        elif m.statement not in lines[m.file]:
            m.status = "not executed"
        else:
            m.status = status.get(m.name, "not checked")
        entry = verdicts.get(m.ident)
        m.verdict = entry["verdict"] if entry else ""
    runs_path = root / "runs.json"
    runs = [r for r in (json.loads(runs_path.read_text()) if runs_path.exists() else []) if r["shard"] == shard.name]
    return {"shard": shard.name, "files": files, "selection": shard.selection, "done_when": shard.done_when,
            "sample": extra.get("sample"), "runs": runs, "mutants": mutants}


def summarise(mutants: list[Mutant]) -> dict[str, int]:
    counts = {"mutants": len(mutants)}
    for key in ("message text", "not executed", "killed", "survived", "timeout", "segfault", "suspicious",
                "no tests", "not checked"):
        counts[key] = sum(m.status == key for m in mutants)
    return counts


def write_report(shards: list[dict], roots: dict[str, Path]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now().isoformat(timespec="seconds")
    survivors_of = lambda ms: [m for m in ms if m.status in ("survived", "not executed")]  # noqa: E731
    payload = {"date": now, "mutmut": MUTMUT_VERSION, "selections": SELECTIONS, "shards": []}
    md = [f"# Mutation testing of the core ({now})", "",
          f"mutmut {MUTMUT_VERSION}, run by `bench/mutation.py` (see its docstring for what runs and how); "
          "2 workers, `nice -n 10`, on the 2-core shared machine. Statuses: *killed* (a test failed), "
          "*survived* (every test that reaches the function passed), *timeout* (counted as killed by mutmut: "
          "the mutant made a test loop), *not executed* (no selected test runs that line: a survivor by "
          "construction, not run), *message text* (only a message changes: not run), *not checked* "
          "(not run: a sample, or the run was stopped).", "",
          "| module | selection | mutants | message text | not executed | run | killed | timeout | survived | "
          "not checked | run time |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for shard in shards:
        wall = f"{sum(r['wall_s'] for r in shard['runs']) / 60:.0f} min"
        rows = [(f"`{f}`", [m for m in shard["mutants"] if m.file == f]) for f in shard["files"]]
        if len(rows) > 1:
            rows.append((f"**{shard['shard']}** (all)", shard["mutants"]))
        for i, (label, ms) in enumerate(rows):
            c = summarise(ms)
            ran = c["killed"] + c["survived"] + c["timeout"] + c["segfault"] + c["suspicious"]
            md.append(f"| {label} | {shard['selection']} | {c['mutants']} | {c['message text']} | "
                      f"{c['not executed']} | {ran} | {c['killed']} | {c['timeout']} | {c['survived']} | "
                      f"{c['not checked'] + c['no tests']} | {wall if i == len(rows) - 1 else ''} |")
    total = summarise([m for s in shards for m in s["mutants"]])
    md += ["", f"All: {total['mutants']} mutants, {total['message text']} message text, {total['not executed']} "
           f"not executed, {total['killed']} killed, {total['timeout']} timeouts, {total['survived']} survived, "
           f"{total['not checked']} not checked.", ""]
    kinds = ("killed by", "equivalent", "not a value/decision", "open", "no verdict")
    md += ["## Survivors' verdicts", "", "| module | survivors | " + " | ".join(kinds) + " |",
           "|---|---|" + "---|" * len(kinds)]
    for shard in shards:
        for file in shard["files"]:
            surv = survivors_of([m for m in shard["mutants"] if m.file == file])
            if surv:
                md.append(f"| `{file}` | {len(surv)} | " +
                          " | ".join(str(sum(kind_of(m.verdict) == k for m in surv)) for k in kinds) + " |")
    killed_later = [m for s in shards for m in s["mutants"] if kind_of(m.verdict) == "killed by"]
    if killed_later:
        md += ["", "## Survivors of earlier runs that new tests kill", "",
               "Each was a survivor; the test named was written for the promise it breaks. `--check-kills` "
               "runs that test alone under the mutant.", "", "| id | where | change | status now | test | check |",
               "|---|---|---|---|---|---|"]
        for m in killed_later:
            md.append(f"| {m.ident} | `{m.file}:{m.line}` {m.function} | `{_md(m.change)}` | {m.status} | "
                      f"{_md(m.verdict[len('killed by '):])} | {_md(m.check)} |")
    for shard in shards:
        surv = survivors_of(shard["mutants"])
        head = f"## {shard['shard']}: survivors ({len(surv)})"
        if shard["sample"]:
            head += f" — sampled: {shard['sample']} of the runnable mutants"
        md += ["", head, ""]
        if not surv:
            md.append("None.")
            continue
        md += ["| id | where | change | status | verdict |", "|---|---|---|---|---|"]
        for m in sorted(surv, key=lambda m: (m.file, m.line)):
            md.append(f"| {m.ident} | `{m.file}:{m.line}` {m.function} | `{_md(m.change)}` | {m.status} | "
                      f"{_md(m.verdict) or '**no verdict**'} |")
    md += ["", "## README/docs claims left untested", "", "| claim | why |", "|---|---|"]
    md += [f"| {claim} | {why} |" for claim, why in UNTESTED_CLAIMS]
    md += ["", "## Test selections", ""]
    md += [f"- **{name}**: {', '.join(t.removeprefix('tests/') for t in tests)}" for name, tests in SELECTIONS.items()]
    (RESULTS / "mutation.md").write_text("\n".join(md) + "\n")
    for shard in shards:
        payload["shards"].append({**{k: v for k, v in shard.items() if k != "mutants"},
                                  "counts": summarise(shard["mutants"]),
                                  "per_file": {f: summarise([m for m in shard["mutants"] if m.file == f])
                                               for f in shard["files"]},
                                  "survivors": [asdict(m) for m in survivors_of(shard["mutants"])],
                                  "killed_by_new_tests": [asdict(m) for m in shard["mutants"]
                                                          if kind_of(m.verdict) == "killed by"]})
    (RESULTS / "mutation.json").write_text(json.dumps(payload, indent=1) + "\n")
    todo = {m.ident: {"where": f"{m.file}:{m.line} {m.function}", "change": m.change, "status": m.status,
                      "name": m.name}
            for s in shards for m in survivors_of(s["mutants"]) if not m.verdict}
    (WORK / "todo.json").write_text(json.dumps(todo, indent=1))
    print(f"wrote {RESULTS / 'mutation.md'} and mutation.json; {len(todo)} survivors without a verdict "
          f"({WORK / 'todo.json'})")


def _ran(shard: Shard) -> bool:
    runs = WORK / shard.selection / "runs.json"
    return runs.exists() and any(r["shard"] == shard.name for r in json.loads(runs.read_text()))


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shard", action="append", choices=[s.name for s in SHARDS],
                        help="run only these shards (default: all, in the order of SHARDS)")
    parser.add_argument("--sample", type=int, help="run at most N runnable mutants per shard (deterministic)")
    parser.add_argument("--max-children", type=int, default=2, help="mutmut workers (default 2)")
    parser.add_argument("--stop-after", type=float, help="stop each shard's mutmut run after this many minutes")
    parser.add_argument("--rerun-survivors", action="store_true", help="re-test survivors and timeouts too")
    parser.add_argument("--rerun-unexplained", action="store_true",
                        help="re-test the survivors and timeouts not explained as equivalent or as no value/decision "
                             "(after adding tests for them)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing; write the report of the copies as last run")
    parser.add_argument("--check-kills", action="store_true",
                        help="run each 'killed by' verdict's test alone under its mutant")
    args = parser.parse_args()
    try:
        import mutmut  # noqa: F401
    except ImportError:
        sys.exit("mutmut is not installed: pip install -e '.[bench]'")
    chosen = [s for s in SHARDS if not args.shard or s.name in args.shard]
    # Shards not run now are reported from their copies as they were run: syncing a copy
    # without running mutmut would pair its statuses with mutants of changed code.
    roots = {sel: prepare(sel) for sel in {s.selection for s in ([] if args.report_only else chosen)}}
    roots.update({s.selection: WORK / s.selection for s in SHARDS if s.selection not in roots and _ran(s)})
    extras: dict[str, dict] = {}
    previous = RESULTS / "mutation.json"
    if previous.exists():
        extras = {s["shard"]: {"sample": s.get("sample")} for s in json.loads(previous.read_text())["shards"]}
    if not args.report_only:
        for shard in chosen:
            extras[shard.name] = run_shard(shard, roots[shard.selection], args)
    verdicts = load_verdicts()
    shards = [collect(s, roots[s.selection], verdicts, extras.get(s.name, {})) for s in SHARDS if _ran(s)]
    if args.check_kills:
        for shard in shards:
            check_kills(roots[shard["selection"]], shard["mutants"])
    write_report(shards, roots)


if __name__ == "__main__":
    main()
