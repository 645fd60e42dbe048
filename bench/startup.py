"""Start-up of every bnfold command, whole process: ``python bench/startup.py [--reps 9]``.

Most models are small and most runs are one model in a CI step, so what a user waits for
is the process: interpreter, imports, the work, exit. On the bundled model
(``models/cnn_ts13.onnx``, 46 KiB) this times, as separate processes taken in turn (the
order rotates every round; one warm-up round is not counted):

- the floors: ``python -c pass``, ``python -c "import onnx"``, ``python -c "import onnxruntime"``;
- onnxruntime's offline pass, the shortest script a user would write
  (``SessionOptions.optimized_model_filepath`` at ``ORT_ENABLE_BASIC``: bench/tools.py
  ``ORT_OFFLINE``), and a bare script creating and running the three onnxruntime
  sessions ``bnfold verify`` runs (``BARE_VERIFY``);
- ``bnfold --version``, ``--help`` (piped, and on a pseudo-terminal, where it draws rich's
  panels), ``fold -q``, ``fold`` (the ledger printed to a pipe),
  ``inspect``, ``verify --providers cpu -q`` and ``recalibrate -q`` (on models/cnn_ts13.npz).

Ratios are medians of per-round ratios, so a slow spell of a shared machine hits both
sides alike. Then, with ``python -X importtime`` (median of 3 runs each): the import time
of each dependency alone, and where a whole ``bnfold fold -q`` spends its import time,
by package. Results: ``bench/results/startup.md`` and ``startup.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import pty
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from run import (  # noqa: E402
    PYTHON,
    REPO,
    TOOLS_PY,
    Bnfold,
    Run,
    child_json,
    last_line,
    machine_info,
    median,
    paired_ratio,
    rotated,
    run_child,
)
from tools import BARE_VERIFY, ORT_OFFLINE  # noqa: E402

MODEL = REPO / "models" / "cnn_ts13.onnx"
DATA = REPO / "models" / "cnn_ts13.npz"
#: verify's random inputs for this model: its dynamic batch dimension at verify's default (2).
VERIFY_SHAPE = "2x1x8x8"
#: Imported alone, one process each: bnfold's dependencies and the runtime it is compared with.
DEPENDENCIES = ("numpy", "google.protobuf.json_format", "ml_dtypes", "onnx", "onnx_ir", "bnfold._onnx_ir", "typer",
                "rich.console", "onnxruntime")
TARGETS = (
    # (row, baseline row or None for seconds, limit, what the issue asks)
    ("bnfold fold -q", "onnxruntime offline pass", 1.0, "bnfold fold <= 1.0x onnxruntime's offline pass"),
    ("bnfold verify -q", "bare 3-session onnxruntime script", 1.1,
     "bnfold verify <= 1.1x a bare three-session onnxruntime script"),
    ("bnfold --help", None, 0.15, "bnfold --help <= 0.15 s (piped)"),
    ("bnfold --help, on a terminal", None, 0.15, "bnfold --help <= 0.15 s (on a terminal)"),
)


def bnfold_with_flags(bnfold: Bnfold, flags: list[str]) -> list[str]:
    """bnfold's command line with interpreter flags (``-X importtime``) added."""
    if bnfold.cmd[0] == PYTHON:
        return [PYTHON, *flags, *bnfold.cmd[1:]]
    return [PYTHON, *flags, *bnfold.cmd]


def commands(bnfold: Bnfold, work: Path) -> dict[str, tuple[list[str], dict]]:
    plain = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the baselines' environment
    folded = work / "folded.onnx"
    out = work / "out.onnx"
    model = str(MODEL)
    return {
        "python -c pass": ([PYTHON, "-c", "pass"], plain),
        "python -c 'import onnx'": ([PYTHON, "-c", "import onnx"], plain),
        "python -c 'import onnxruntime'": ([PYTHON, "-c", "import onnxruntime"], plain),
        "onnxruntime offline pass": ([PYTHON, "-c", ORT_OFFLINE, model, str(work / "ort.onnx")], plain),
        "bare 3-session onnxruntime script": ([PYTHON, "-c", BARE_VERIFY, model, str(folded), VERIFY_SHAPE], plain),
        "bnfold --version": ([*bnfold.cmd, "--version"], bnfold.env),
        "bnfold --help": ([*bnfold.cmd, "--help"], bnfold.env),
        "bnfold --help, on a terminal": ([*bnfold.cmd, "--help"], bnfold.env),
        "bnfold fold -q": ([*bnfold.cmd, "fold", model, "-o", str(out), "-q"], bnfold.env),
        "bnfold fold": ([*bnfold.cmd, "fold", model, "-o", str(out)], bnfold.env),
        "bnfold inspect": ([*bnfold.cmd, "inspect", model], bnfold.env),
        "bnfold verify -q": ([*bnfold.cmd, "verify", model, str(folded), "--providers", "cpu", "-q"], bnfold.env),
        "bnfold recalibrate -q": ([*bnfold.cmd, "recalibrate", model, "--data", str(DATA), "-o", str(out), "-q"],
                                  bnfold.env),
    }


def run_on_terminal(argv: list[str], env: dict, cwd: Path) -> Run:
    """``run_child`` with stdout on a pseudo-terminal (drained as it is written)."""
    main_fd, terminal_fd = pty.openpty()

    def drain():
        while True:
            try:
                if not os.read(main_fd, 65536):
                    return
            except OSError:  # the other end is closed and everything was read
                return

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        start = time.perf_counter()
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=terminal_fd, stderr=subprocess.PIPE,
                                   env={**env, "COLUMNS": "100"}, cwd=cwd)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        stderr = process.stderr.read().decode(errors="replace")[-4000:]
    finally:
        os.close(terminal_fd)
        reader.join(timeout=10)
        os.close(main_fd)
    return Run(wall, usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status), stderr)


def importtime(argv: list[str], env: dict, cwd: Path) -> str:
    """The ``-X importtime`` report (stderr) of ``argv`` run to the end."""
    done = subprocess.run(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed (exit {done.returncode}): {last_line(done.stderr)}")
    return done.stderr


def importtime_lines(stderr: str) -> list[tuple[int, int, int, str]]:
    """(self us, cumulative us, depth, module) of each ``-X importtime`` line."""
    rows = []
    for line in stderr.splitlines():
        parts = line.split("|")
        if len(parts) != 3 or not line.startswith("import time:") or not parts[1].strip().isdigit():
            continue
        name = parts[2].rstrip()
        depth = (len(name) - len(name.lstrip()) - 1) // 2
        rows.append((int(parts[0].split(":")[1]), int(parts[1]), depth, name.strip()))
    return rows


def dependency_imports(bnfold: Bnfold, work: Path, runs: int) -> dict[str, float | str]:
    """Each dependency imported alone: the cumulative import time of the top-level imports
    that ``python -c pass`` does not make (so a package's own dependencies are included)."""
    base = importtime([*bnfold.python, "-X", "importtime", "-c", "pass"], bnfold.env, work)
    at_start = {name for _, _, depth, name in importtime_lines(base) if depth == 0}
    result: dict[str, float | str] = {}
    for name in DEPENDENCIES:
        samples = []
        for _ in range(runs):
            try:
                report = importtime([*bnfold.python, "-X", "importtime", "-c", f"import {name}"], bnfold.env, work)
            except RuntimeError as exc:
                result[name] = f"failed: {exc}"
                break
            samples.append(sum(cum for _, cum, depth, module in importtime_lines(report)
                               if depth == 0 and module not in at_start) / 1e6)
        else:
            result[name] = statistics.median(samples)
    return result


def fold_import_breakdown(bnfold: Bnfold, work: Path, runs: int) -> dict[str, float]:
    """Own (self) import time of a whole ``bnfold fold -q`` by top-level package; the
    standard library as one entry."""
    stdlib = set(sys.stdlib_module_names)
    samples: dict[str, list[float]] = {}
    for _ in range(runs):
        report = importtime(bnfold_with_flags(bnfold, ["-X", "importtime"])
                            + ["fold", str(MODEL), "-o", str(work / "out.onnx"), "-q"], bnfold.env, work)
        totals: dict[str, float] = {}
        for own, _, _, module in importtime_lines(report):
            top = module.split(".")[0]
            key = "standard library" if top in stdlib else "google.protobuf" if top == "google" else top
            totals[key] = totals.get(key, 0.0) + own / 1e6
        for key, value in totals.items():
            samples.setdefault(key, []).append(value)
    breakdown = {key: statistics.median(values + [0.0] * (runs - len(values))) for key, values in samples.items()}
    return dict(sorted(breakdown.items(), key=lambda kv: -kv[1]))


def measure(bnfold: Bnfold, work: Path, reps: int, log) -> dict:
    cmds = commands(bnfold, work)
    prepared = run_child([*bnfold.cmd, "fold", str(MODEL), "-o", str(work / "folded.onnx"), "-q"], env=bnfold.env)
    if not prepared.ok:
        raise RuntimeError(f"bnfold fold failed: {last_line(prepared.stderr)}")
    samples: dict[str, list] = {name: [] for name in cmds}
    errors: dict[str, str] = {}
    for round_ in range(reps + 1):  # round 0 warms the page cache and the .pyc files
        for name in rotated(cmds, round_):
            argv, env = cmds[name]
            run = run_on_terminal(argv, env, work) if "terminal" in name else run_child(argv, env=env, cwd=work)
            if not run.ok:
                errors[name] = f"exit {run.code}: {last_line(run.stderr)}"
            if round_ > 0:
                samples[name].append(run.wall if run.ok else None)
        if round_ > 0:
            log(f"round {round_}/{reps}: " + ", ".join(
                f"{name} {samples[name][-1]:.3f}" for name in ("bnfold fold -q", "onnxruntime offline pass")
                if samples[name][-1] is not None))
    return {"wall_s": samples, "errors": errors}


def targets(wall: dict[str, list]) -> list[dict]:
    rows = []
    for name, baseline, limit, text in TARGETS:
        value = paired_ratio(wall[name], wall[baseline]) if baseline else median(wall[name])
        rows.append({"target": text, "value": value, "unit": "x" if baseline else " s", "limit": limit,
                     "ok": value is not None and value <= limit})
    return rows


def markdown(results: dict) -> str:
    meta, machine = results["meta"], results["meta"]["machine"]
    wall = results["wall_s"]
    ort = wall["onnxruntime offline pass"]
    lines = [
        "# bnfold start-up: whole-process wall time on the bundled model",
        "",
        f"- date: {meta['date']}; {meta['reps']} measured rounds after 1 warm-up, commands in turn "
        "(the order rotates each round); medians; ratios are medians of per-round ratios",
        f"- machine: {machine['cpu']}, {machine['cores']} cores, {machine['platform']}; **shared with other "
        "sessions working in parallel**: 1-min load average "
        f"{machine['loadavg_at_start'][0]:.1f} at start, {meta['loadavg_at_end'][0]:.1f} at the end",
        f"- Python {machine['python']}; " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v),
        f"- model: `models/{MODEL.name}` ({MODEL.stat().st_size // 1024} KiB); bnfold launched as `{meta['bnfold']}`",
        "",
        "| command | wall s (median) | min s | ÷ onnxruntime offline pass |",
        "|---|---|---|---|",
    ]
    for name, values in wall.items():
        ok = [v for v in values if v is not None]
        ratio = paired_ratio(values, ort)
        error = results["errors"].get(name)
        lines.append(f"| `{name}` | {median(values):.3f} | {min(ok):.3f} | {ratio:.2f} |" if ok and ratio
                     else f"| `{name}` | failed: {error} | | |")
    lines += ["", "## Targets", "", "| target | measured | holds |", "|---|---|---|"]
    for row in results["targets"]:
        value = "—" if row["value"] is None else f"{row['value']:.3f}{row['unit']}"
        lines.append(f"| {row['target']} | {value} | {'yes' if row['ok'] else '**no**'} |")
    deps = results["dependency_imports"]
    lines += ["", "## Import time of each dependency alone", "",
              "`python -X importtime -c 'import X'`, cumulative (a package's own dependencies included; "
              "numpy in most), median of 3 runs:", "", "| import | s |", "|---|---|"]
    for name, value in deps.items():
        lines.append(f"| `{name}` | {value if isinstance(value, str) else f'{value:.3f}'} |")
    lines += ["", "## Where `bnfold fold -q` spends its import time", "",
              "`-X importtime` of the whole command, own time of every module summed by top-level package, "
              "median of 3 runs (importtime's own bookkeeping inflates it; the sum is "
              f"{sum(results['fold_imports'].values()):.3f} s):", "", "| package | s |", "|---|---|"]
    for name, value in results["fold_imports"].items():
        if value >= 0.0005:
            lines.append(f"| {name} | {value:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=9, help="measured rounds (default 9; the issue asks >= 7)")
    parser.add_argument("--bnfold-src", type=Path,
                        help="time the bnfold package under this folder (PYTHONPATH) instead of the installed one")
    parser.add_argument("--results", type=Path, default=BENCH / "results",
                        help="folder for startup.md and startup.json")
    args = parser.parse_args(argv)
    bnfold = Bnfold(args.bnfold_src.resolve() if args.bnfold_src else None)
    bnfold.compile()
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {message}", flush=True)

    with tempfile.TemporaryDirectory(prefix="bnfold-startup-") as folder:
        work = Path(folder)
        versions = child_json([*bnfold.python, TOOLS_PY, "versions", str(work / "versions.json")],
                              work / "versions.json", env=bnfold.env, cwd=work)
        machine = machine_info()
        log(f"{args.reps} rounds of {len(commands(bnfold, work))} commands")
        timed = measure(bnfold, work, args.reps, log)
        log("-X importtime")
        results = {
            "meta": {"date": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "reps": args.reps,
                     "machine": machine, "versions": versions, "bnfold": bnfold.describe(),
                     "model": str(MODEL.relative_to(REPO)), "loadavg_at_end": os.getloadavg()},
            **timed,
            "wall_s_median": {name: median(values) for name, values in timed["wall_s"].items()},
            "targets": targets(timed["wall_s"]),
            "dependency_imports": dependency_imports(bnfold, work, 3),
            "fold_imports": fold_import_breakdown(bnfold, work, 3),
        }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "startup.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.results / "startup.md").write_text(markdown(results))
    print(markdown(results))
    log(f"wrote {args.results / 'startup.md'} and startup.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
