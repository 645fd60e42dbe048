"""bnfold's benchmark suite: ``python bench/run.py [--quick]``.

Builds its own models under ``bench/work/`` (see ``bench/models.py``), then, per model and
in one run, with every tool a separate child process and the tools alternating (the order
rotates every round, so no tool always runs first or after the same neighbour):

1. wall time of ``bnfold fold`` against a bare ``onnx.load``+``onnx.save``, a bare
   ``onnx_ir`` load+save, onnxoptimizer, onnxscript's BN rules, onnxsim, OnnxSlim and
   onnxruntime's offline optimisation (``bench/tools.py`` runs each);
2. peak RSS of each process (``os.wait4``'s rusage of that child);
3. ORT CPU latency and session-creation time of the original and the folded model,
   optimisations disabled and default, and the original at ORT's basic and extended
   levels (``bench/latency.py``);
4. the folded model's largest output difference (``bnfold verify --json``).

It writes ``bench/results/latest.json`` (every sample) and ``latest.md`` (tables of
medians and ratios). Ratios against a baseline are medians of the per-round ratios, so a
slow spell of the machine hits both sides of each ratio alike.

The harness itself imports neither numpy nor onnx: a child's peak RSS includes the RSS of
the process it was forked from, so the parent must stay small.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PYTHON = sys.executable
TOOLS_PY = str(BENCH / "tools.py")

#: Tools in report order; "bnfold" is the subject, the rest are baselines and peers.
TOOLS = ("bnfold", "onnx-floor", "ir-floor", "onnxoptimizer", "onnxscript", "onnxsim", "onnxslim", "ort")
PEERS = ("onnxoptimizer", "onnxscript", "onnxsim", "onnxslim")
TOOL_TITLES = {
    "bnfold": "bnfold fold",
    "onnx-floor": "onnx.load + onnx.save",
    "ir-floor": "onnx_ir load + save",
    "onnxoptimizer": "onnxoptimizer (fuse_bn_into_conv)",
    "onnxscript": "onnxscript BN rewrite rules",
    "onnxsim": "onnxsim (check_n=0)",
    "onnxslim": "OnnxSlim",
    "ort": "onnxruntime offline (basic)",
}
#: Python packages each peer needs: a missing one is reported, not fatal.
TOOL_PACKAGES = {"onnxoptimizer": "onnxoptimizer", "onnxscript": "onnxscript", "onnxsim": "onnxsim",
                 "onnxslim": "onnxslim"}
MIB = 2**20
#: bench/latency.py's A/A ratio: two sessions of the same model, the measurement's own noise.
A_A = "original-again/disabled ÷ original/disabled"
TOOL_TIMEOUT_S = 600


# --------------------------------------------------------------------------- processes


class Run:
    """One child process: wall seconds, peak RSS (bytes), exit code, stderr tail."""

    def __init__(self, wall: float, maxrss: int, code: int, stderr: str):
        self.wall, self.maxrss, self.code, self.stderr = wall, maxrss, code, stderr

    @property
    def ok(self) -> bool:
        return self.code == 0


def run_child(cmd: list[str], env: dict | None = None, cwd: Path | None = None,
              timeout: float = TOOL_TIMEOUT_S) -> Run:
    """Spawn, reap with wait4 (per-child rusage), and time from spawn to reap."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read().decode(errors="replace")[-4000:]
    return Run(wall, usage.ru_maxrss * 1024, proc.returncode, stderr)


def child_json(cmd: list[str], report: Path, env=None, cwd=None, timeout=TOOL_TIMEOUT_S) -> dict:
    """Run a helper child that writes a JSON report, and read it; raise with its stderr on failure."""
    report.unlink(missing_ok=True)
    run = run_child(cmd, env=env, cwd=cwd, timeout=timeout)
    if not run.ok or not report.exists():
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {run.code}): {last_line(run.stderr)}")
    return json.loads(report.read_text())


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


class Bnfold:
    """How to launch bnfold: the installed console script, or ``python -P -m bnfold`` from --bnfold-src."""

    def __init__(self, src: Path | None):
        self.env = dict(os.environ)
        self.env.pop("PYTHONPATH", None)
        if src is not None:
            self.env["PYTHONPATH"] = str(src)
            self.cmd = [PYTHON, "-P", "-m", "bnfold"]
        else:
            script = Path(PYTHON).with_name("bnfold")
            self.cmd = [str(script)] if script.exists() else [PYTHON, "-P", "-m", "bnfold"]
        self.python = [PYTHON, "-P"] if src is not None else [PYTHON]

    def compile(self) -> None:
        """Write bnfold's bytecode, as installing a wheel does: with PYTHONDONTWRITEBYTECODE set
        (or a read-only checkout) an editable install would recompile bnfold on every run,
        ~50 ms that the peers, compiled when pip installed them, never pay."""
        code = ("import compileall, importlib.util, os, sys; spec = importlib.util.find_spec('bnfold'); "
                "sys.exit(not compileall.compile_dir(os.path.dirname(spec.origin), quiet=1))")
        subprocess.run([*self.python, "-c", code], env=self.env, check=True)

    def describe(self) -> str:
        where = self.env.get("PYTHONPATH")
        return " ".join(self.cmd) + (f" (PYTHONPATH={where})" if where else "")


def tool_command(tool: str, bnfold: Bnfold, src: Path, out: Path, external: bool) -> list[str]:
    if tool == "bnfold":
        return [*bnfold.cmd, "fold", str(src), "-o", str(out), "-q"]
    return [PYTHON, TOOLS_PY, tool, str(src), str(out), *(["--external"] if external else [])]


def remove_output(out: Path) -> None:
    out.unlink(missing_ok=True)
    Path(str(out) + ".data").unlink(missing_ok=True)
    for staging in out.parent.glob(f".{out.name}.*"):  # bnfold's staging folder if a run was killed
        shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------- statistics


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def paired_ratio(a: list, b: list):
    """Median over rounds of a[i] / b[i]; rounds where either side failed are skipped."""
    ratios = [x / y for x, y in zip(a, b) if x is not None and y]
    return statistics.median(ratios) if ratios else None


def rotated(items, shift: int) -> list:
    items = list(items)
    if not items:
        return items
    shift %= len(items)
    return items[shift:] + items[:shift]


# --------------------------------------------------------------------------- sections


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem, "python": platform.python_version(),
            "platform": platform.platform(), "loadavg_at_start": load}


def startup(bnfold: Bnfold, workdir: Path, tiny: Path, reps: int, log) -> dict:
    """Import and start-up cost of the CLI, and which heavy packages each invocation imports."""
    out = workdir / "tiny.folded.onnx"
    commands = {
        "python -c pass": [PYTHON, "-c", "pass"],
        "import bnfold.cli": [*bnfold.python, "-c", "import bnfold.cli"],
        "bnfold --help": [*bnfold.cmd, "--help"],
        f"bnfold fold {tiny.name}": [*bnfold.cmd, "fold", str(tiny), "-o", str(out), "-q"],
    }
    samples: dict[str, list] = {k: [] for k in commands}
    errors: dict[str, str] = {}
    for round_ in range(reps + 1):
        for name in rotated(commands, round_):
            run = run_child(commands[name], env=bnfold.env, cwd=workdir)
            remove_output(out)
            if not run.ok:
                errors[name] = last_line(run.stderr)
            elif round_ > 0:  # round 0 warms the page cache and the .pyc files
                samples[name].append(run.wall)
    result = {"wall_s": samples, "wall_s_median": {k: median(v) for k, v in samples.items()}, "errors": errors}
    # -X importtime: where bnfold.cli's own import time goes.
    run = run_child([*bnfold.python, "-X", "importtime", "-c", "import bnfold.cli"], env=bnfold.env, cwd=workdir)
    cumulative = {}
    for line in run.stderr.splitlines():
        parts = line.split("|")
        if len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        name = parts[2].rstrip()
        depth = (len(name) - len(name.lstrip()) - 1) // 2  # importtime indents nested imports
        if depth <= 1 or name.strip().startswith("bnfold"):
            cumulative[name.strip()] = max(cumulative.get(name.strip(), 0.0), int(parts[1]) / 1e6)
    result["importtime_cumulative_s"] = dict(sorted(cumulative.items(), key=lambda kv: -kv[1])[:8])
    result["imports"] = {}
    report = workdir / "modules.json"
    for label, argv in (("bnfold --help", ["--help"]),
                        (f"bnfold fold {tiny.name}", ["fold", str(tiny), "-o", str(out), "-q"])):
        try:
            data = child_json([*bnfold.python, TOOLS_PY, "modules", str(report), *argv], report,
                              env=bnfold.env, cwd=workdir)
            result["imports"][label] = data["imported"]
        except RuntimeError as exc:
            result["imports"][label] = {"error": str(exc)}
        remove_output(out)
    log("startup: " + ", ".join(f"{k} {v:.3f}s" for k, v in result["wall_s_median"].items() if v is not None))
    return result


def fold_timings(model: dict, tools: list[str], bnfold: Bnfold, workdir: Path, reps: int, warmup: int,
                 log) -> dict:
    """Alternate every tool ``reps`` times on one model; describe each tool's output once."""
    src = Path(model["path"])
    external = model["external"]
    samples = {t: {"wall_s": [], "maxrss_bytes": []} for t in tools}
    failed: dict[str, str] = {}
    outputs: dict[str, dict] = {}
    keep_outputs = {"bnfold"}  # kept for latency and verify
    for round_ in range(warmup + reps):
        counted = round_ >= warmup
        for tool in rotated(tools, round_):
            if tool in failed:
                if counted:
                    samples[tool]["wall_s"].append(None)
                    samples[tool]["maxrss_bytes"].append(None)
                continue
            out = workdir / f"{src.stem}.{tool}.onnx"
            remove_output(out)
            env = bnfold.env if tool == "bnfold" else None
            run = run_child(tool_command(tool, bnfold, src, out, external), env=env, cwd=workdir)
            if not run.ok:
                failed[tool] = f"exit {run.code}: {last_line(run.stderr)}"
                log(f"  {model['key']}: {tool} FAILED: {failed[tool]}")
            if counted:
                samples[tool]["wall_s"].append(run.wall if run.ok else None)
                samples[tool]["maxrss_bytes"].append(run.maxrss if run.ok else None)
            if run.ok and tool not in outputs:
                report = workdir / "describe.json"
                try:
                    outputs[tool] = child_json([PYTHON, TOOLS_PY, "describe", str(out), str(report)], report,
                                               cwd=workdir)
                except RuntimeError as exc:
                    outputs[tool] = {"error": str(exc)}
            if tool not in keep_outputs or round_ < warmup + reps - 1 or not run.ok:
                remove_output(out)
        walls = ", ".join(
            f"{t} {samples[t]['wall_s'][-1]:.2f}s" for t in tools
            if counted and samples[t]["wall_s"] and samples[t]["wall_s"][-1] is not None)
        log(f"  {model['key']} round {round_ + 1}/{warmup + reps}{' (warm-up)' if not counted else ''}"
            + (f": {walls}" if walls else ""))
    result = {}
    base = samples.get("bnfold", {}).get("wall_s", [])
    for tool in tools:
        wall, rss = samples[tool]["wall_s"], samples[tool]["maxrss_bytes"]
        result[tool] = {
            "wall_s": wall,
            "maxrss_bytes": rss,
            "wall_s_median": median(wall),
            "wall_s_min": min((w for w in wall if w is not None), default=None),
            "maxrss_bytes_median": median(rss),
            "bnfold_over_this": paired_ratio(base, wall) if tool != "bnfold" else 1.0,
            "output": outputs.get(tool),
            "error": failed.get(tool),
        }
    return result


def latency(model: dict, folded: Path, bnfold: Bnfold, workdir: Path, runs: int, warmup: int, creations: int,
            threads: int) -> dict:
    report = workdir / "latency.json"
    cmd = [PYTHON, str(BENCH / "latency.py"), model["path"], str(folded), str(report),
           "--inputs", json.dumps(model["inputs"]), "--runs", str(runs), "--warmup", str(warmup),
           "--creations", str(creations), "--threads", str(threads)]
    return child_json(cmd, report, cwd=workdir, timeout=1800)


def verify(model: dict, folded: Path, bnfold: Bnfold, workdir: Path) -> dict:
    """``bnfold verify --providers cpu --json``: the largest differences over outputs and runs."""
    report = workdir / "verify.json"
    report.unlink(missing_ok=True)
    cmd = [*bnfold.cmd, "verify", model["path"], str(folded), "--providers", "cpu", "--json", str(report), "-q"]
    run = run_child(cmd, env=bnfold.env, cwd=workdir, timeout=1800)
    if not report.exists():
        return {"error": f"bnfold verify exit {run.code}: {last_line(run.stderr)}"}
    data = json.loads(report.read_text())
    diffs = [c.get("difference") or {} for c in data.get("comparisons", [])]
    return {
        "verdict": data.get("verdict"),
        "max_abs_diff": max((d.get("max_abs_diff", 0.0) for d in diffs), default=None),
        "max_rel_diff": max((d.get("max_rel_diff", 0.0) for d in diffs), default=None),
        "wall_s": run.wall,
    }


# --------------------------------------------------------------------------- report


def fmt(value, spec=".2f", suffix="") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def mib(value) -> str:
    return "—" if value is None else f"{value / MIB:.0f}"


def targets(results: dict) -> list[dict]:
    """The issue's targets, each with the measured number and whether it holds."""
    rows = []
    for model in results["models"]:
        key, timing = model["key"], model.get("fold") or {}
        bn = timing.get("bnfold") or {}
        if not bn.get("wall_s_median"):
            continue
        if not model["external"]:
            ratio = (timing.get("onnx-floor") or {}).get("bnfold_over_this")
            rows.append({"model": key, "target": "wall <= 0.35x onnx.load+onnx.save", "value": ratio,
                         "ok": ratio is not None and ratio <= 0.35})
        else:
            ratio = (timing.get("ir-floor") or {}).get("bnfold_over_this")
            rows.append({"model": key, "target": "wall <= 1.1x onnx_ir load+save", "value": ratio,
                         "ok": ratio is not None and ratio <= 1.1})
            rss = bn.get("maxrss_bytes_median")
            share = rss / model["weight_bytes"] if rss else None
            small = model["weight_bytes"] < 300 * MIB
            rows.append({"model": key, "target": "peak RSS <= 0.5x weight bytes", "value": share,
                         "detail": "model under 300 MiB: the interpreter's ~75 MiB dominates; the target is for the "
                                   "40-layer stack" if small else None,
                         "ok": share is not None and share <= 0.5})
        slower = [p for p in PEERS if (timing.get(p) or {}).get("bnfold_over_this") is not None
                  and timing[p]["bnfold_over_this"] >= 1.0]
        measured = [p for p in PEERS if (timing.get(p) or {}).get("bnfold_over_this") is not None]
        worst = max(((timing[p]["bnfold_over_this"], p) for p in measured), default=(None, None))
        left = ((timing.get(worst[1]) or {}).get("output") or {}).get("bn") if worst[1] else None
        detail = (f"worst: {worst[1]}" + (f", which left {left} BN unfolded" if left else "")) if worst[1] \
            else "no peer measured"
        rows.append({"model": key, "target": "faster than every Python peer",
                     "value": worst[0], "detail": detail,
                     "ok": bool(measured) and not slower})
        ratios = (model.get("latency") or {}).get("ratios")
        if ratios:
            for name, target, limit in (
                ("folded/disabled ÷ original/default", "latency: folded ORT_DISABLE_ALL <= original default opt", 1.0),
                ("folded/disabled ÷ original/disabled", "latency: folded ORT_DISABLE_ALL < original ORT_DISABLE_ALL", 1.0),
                ("folded/disabled ÷ original/basic", "(extra) latency: folded ORT_DISABLE_ALL <= original ORT_ENABLE_BASIC", 1.0),
                ("folded/disabled ÷ original/extended",
                 "(extra) latency: folded ORT_DISABLE_ALL <= original ORT_ENABLE_EXTENDED", 1.0),
            ):
                value = ratios[name]
                ok = value < limit if "<" in target and "<=" not in target else value <= limit
                low, high = (model["latency"].get("ratio_ci95") or {}).get(name, (value, value))
                # Within noise: the interval, widened by how far two sessions of one model
                # differ (the A/A ratio), holds the limit.
                spread = abs(ratios.get(A_A, 1.0) - 1.0)
                rows.append({"model": key, "target": target, "value": value, "ok": ok,
                             "detail": f"95% interval {low:.3f}–{high:.3f}, A/A {ratios.get(A_A, 1.0):.3f}",
                             "tie": low - spread <= limit <= high + spread})
    imports = (results.get("startup") or {}).get("imports") or {}
    for label, loaded in imports.items():
        heavy = [m for m in ("onnxruntime", "torch") if isinstance(loaded, dict) and loaded.get(m)]
        rows.append({"model": "startup", "target": f"{label}: no onnxruntime/torch import",
                     "value": None, "detail": ", ".join(heavy) or ("error" if "error" in loaded else "none"),
                     "ok": "error" not in loaded and not heavy})
    return rows


def machine_cores(results: dict):
    return results["meta"]["machine"]["cores"]


def markdown(results: dict) -> str:
    meta = results["meta"]
    machine = meta["machine"]
    lines = [
        "# bnfold benchmark results",
        "",
        f"- date: {meta['date']}; mode: {meta['mode']} ({meta['reps']} measured rounds"
        f"{', 1 warm-up' if meta['warmup'] else ''}, tools alternating; ratios are medians of per-round ratios)",
        f"- machine: {machine['cpu']}, {machine['cores']} cores, "
        f"{fmt((machine['memory_bytes'] or 0) / 2**30, '.0f')} GiB, {machine['platform']}; "
        f"load average at start {', '.join(f'{x:.1f}' for x in machine['loadavg_at_start'] or [])}",
        f"- Python {machine['python']}; " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v),
        f"- bnfold launched as: `{meta['bnfold']}`",
    ]
    if meta.get("noisy"):
        lines.append(f"- **{meta['noisy']}**")
    missing = meta.get("missing_tools") or {}
    for tool, why in missing.items():
        lines.append(f"- not measured: {tool} ({why})")
    lines += ["", "## Summary: bnfold fold wall time as a ratio (lower is better; < 1 means bnfold is faster)", ""]
    head = ["model", "weights MiB", "bnfold s", "× onnx load+save", "× onnx_ir load+save",
            *[f"× {p}" for p in PEERS], "× ort offline", "bnfold RSS MiB", "RSS / weights"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model in results["models"]:
        timing = model.get("fold") or {}
        bn = timing.get("bnfold") or {}
        ratio = lambda t: fmt((timing.get(t) or {}).get("bnfold_over_this"), ".2f")  # noqa: E731
        rss = bn.get("maxrss_bytes_median")
        big = model["weight_bytes"] >= MIB  # below that, RSS / weights only measures the interpreter
        lines.append("| " + " | ".join([
            model["key"], mib(model["weight_bytes"]) if big else "< 1", fmt(bn.get("wall_s_median"), ".2f"),
            ratio("onnx-floor"), ratio("ir-floor"), *[ratio(p) for p in PEERS], ratio("ort"),
            mib(rss), fmt(rss / model["weight_bytes"] if rss and big else None, ".2f"),
        ]) + " |")
    gaps = [(m["key"], ((m.get("fold") or {}).get("ort") or {}).get("bnfold_over_this")) for m in results["models"]]
    gaps = [(k, g) for k, g in gaps if g is not None]
    if gaps:
        lines += ["", "Against onnxruntime's offline optimisation (C++, no Python protobuf round trip), bnfold's "
                  "wall time is " + ", ".join(f"{g:.2f}x on {k}" for k, g in gaps)
                  + " of onnxruntime's (< 1: bnfold is faster). Where the time goes: bench/README.md, "
                  "\"Where the time goes, and the gap to onnxruntime\"."]
    for model in results["models"]:
        timing = model.get("fold") or {}
        load = model.get("loadavg_before")
        lines += ["", f"## {model['key']}: {model['title']}", "",
                  f"{mib(model['weight_bytes'])} MiB of weights, {mib(model['file_bytes'])} MiB on disk, "
                  f"{model['bn_count']} BatchNormalization"
                  + (f"; 1-min load average {load[0]:.1f} before, {model['loadavg_after_fold'][0]:.1f} after "
                     f"the fold timings ({machine_cores(results)} cores)." if load else "."), ""]
        head = ["tool", "wall s (median)", "min s", "bnfold ÷ this", "peak RSS MiB", "BN left", "note"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for tool, data in timing.items():
            out = data.get("output") or {}
            note = data.get("error") or out.get("error") or ""
            lines.append("| " + " | ".join([
                TOOL_TITLES.get(tool, tool), fmt(data["wall_s_median"], ".3f"), fmt(data["wall_s_min"], ".3f"),
                fmt(data["bnfold_over_this"], ".2f"), mib(data["maxrss_bytes_median"]),
                str(out.get("bn", "—")), note.replace("|", "/")[:120],
            ]) + " |")
        lat = model.get("latency") or {}
        if "configs" in lat:
            c = lat["configs"]
            lines += ["", f"ORT CPU inference, batch 1, intra_op_num_threads={lat['threads']}, "
                          f"median of {lat['runs']} runs after {lat['warmup']} warm-up "
                          f"(session creation: median of {lat['creations']}):", "",
                      "| model | ORT optimisation | run ms (median) | min ms | session creation s | max abs diff vs original, disabled |",
                      "|---|---|---|---|---|---|"]
            levels = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
                      "default": "default (ORT_ENABLE_ALL)"}
            for key, data in c.items():
                m, level = key.split("/")
                lines.append(f"| {m.replace('original-again', 'original, 2nd session')} | {levels[level]} | {data['run_ms_median']:.2f} | {data['run_ms_min']:.2f} | "
                             f"{data['create_s_median']:.3f} | {data['diff_vs_original_disabled']['max_abs_diff']:.3g} |")
            ci = lat.get("ratio_ci95") or {}
            lines += ["", "| per-round ratio | median | 95% interval of the median |", "|---|---|---|"]
            for name, value in lat["ratios"].items():
                num, den = (part.strip().split("/") for part in name.split("÷"))
                interval = "–".join(f"{x:.3f}" for x in ci[name]) if name in ci else "—"
                label = ("A/A: a second session of the original ÷ the first, both ORT_DISABLE_ALL (noise)"
                         if name == A_A else f"{num[0]} {levels[num[1]]} ÷ {den[0]} {levels[den[1]]}")
                lines.append(f"| {label} | **{value:.3f}** | {interval} |")
            lines += ["", f"Largest output {c['original/disabled']['diff_vs_original_disabled']['max_abs_output']:.3g}; "
                          "ORT's own default optimisation moves the original's output by max abs "
                          f"{c['original/default']['diff_vs_original_disabled']['max_abs_diff']:.3g}."]
        elif lat.get("error"):
            lines += ["", f"latency: {lat['error']}"]
        ver = model.get("verify") or {}
        if ver.get("error"):
            own = (lat.get("configs") or {}).get("folded/disabled", {}).get("diff_vs_original_disabled")
            lines += ["", f"verify: {ver['error']}"]
            if own:
                lines.append(f"(latency harness's own comparison, folded vs original, both ORT_DISABLE_ALL: "
                             f"max abs {own['max_abs_diff']:.3g}, max rel {own['max_rel_diff']:.3g})")
        elif ver:
            lines += ["", f"`bnfold verify` (CPU): {ver['verdict']}, max abs diff {ver['max_abs_diff']:.3g}, "
                          f"max rel diff {ver['max_rel_diff']:.3g}."]
    st = results.get("startup")
    if st:
        lines += ["", "## Start-up", "", "| command | wall s (median) |", "|---|---|"]
        for name, value in st["wall_s_median"].items():
            lines.append(f"| `{name}` | {fmt(value, '.3f')}{' (failed: ' + st['errors'][name] + ')' if name in st['errors'] else ''} |")
        lines += ["", "Cumulative import time (`python -X importtime -c 'import bnfold.cli'`): "
                  + ", ".join(f"{k} {v:.3f}s" for k, v in st["importtime_cumulative_s"].items()), ""]
        for label, loaded in st["imports"].items():
            if "error" in loaded:
                lines.append(f"- `{label}`: {loaded['error']}")
            else:
                lines.append(f"- `{label}` imports: " + ", ".join(k for k, v in loaded.items() if v))
    lines += ["", "## Targets (from the issue)", "", "| model | target | measured | holds |", "|---|---|---|---|"]
    for row in results["targets"]:
        value = fmt(row["value"], ".3f") if row.get("value") is not None else ""
        detail = row.get("detail")
        lines.append(f"| {row['model']} | {row['target']} | {value}{' (' + detail + ')' if detail else ''} | "
                     f"{'within noise' if row.get('tie') else 'yes' if row['ok'] else '**no**'} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def available_tools(requested: list[str]) -> tuple[list[str], dict[str, str]]:
    """Drop peers whose package is not installed (``pip install -e '.[bench]'``)."""
    missing = {}
    for tool, package in TOOL_PACKAGES.items():
        if tool in requested:
            probe = subprocess.run([PYTHON, "-c", f"import importlib.util, sys; "
                                    f"sys.exit(importlib.util.find_spec({package!r}) is None)"])
            if probe.returncode != 0:
                missing[tool] = f"{package} not installed: pip install -e '.[bench]'"
    return [t for t in requested if t not in missing], missing


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="3 rounds, no warm-up, a 10-layer external-data conv stack only, short latency runs (~3 min; noisy)")
    parser.add_argument("--reps", type=int, help="measured rounds per model (default 5; 3 with --quick)")
    parser.add_argument("--warmup", type=int, help="unmeasured first rounds (default 1; 0 with --quick)")
    parser.add_argument("--models", help="comma-separated subset of resnet50,convstack,convstack-ext,mlp,zoo "
                                           "(default all; --quick skips the embedded conv stack)")
    parser.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated subset of {','.join(TOOLS)}")
    parser.add_argument("--stack-layers", type=int, help="layers of the 512-channel conv stack (default 40; 10 with --quick)")
    parser.add_argument("--latency-runs", type=int, help="ORT runs per session (default 60; 10 with --quick)")
    parser.add_argument("--no-latency", action="store_true", help="skip ORT latency and verify")
    parser.add_argument("--no-startup", action="store_true", help="skip the start-up measurements")
    parser.add_argument("--bnfold-src", type=Path,
                        help="benchmark the bnfold package under this folder (PYTHONPATH) instead of the installed one")
    parser.add_argument("--workdir", type=Path, default=BENCH / "work")
    parser.add_argument("--results", type=Path, default=BENCH / "results", help="folder for latest.md/latest.json")
    parser.add_argument("--keep", action="store_true", help="keep bench/work (models and bnfold outputs)")
    args = parser.parse_args(argv)

    reps = args.reps or (3 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    layers = args.stack_layers or (10 if args.quick else 40)
    latency_runs = args.latency_runs or (10 if args.quick else 60)
    creations = 1 if args.quick else 3
    models_arg = args.models or ("resnet50,convstack-ext,mlp,zoo" if args.quick else "resnet50,convstack,convstack-ext,mlp,zoo")
    model_keys = [k for k in models_arg.split(",") if k]
    requested = [t for t in args.tools.split(",") if t]
    unknown = [t for t in requested if t not in TOOLS]
    if unknown:
        parser.error(f"unknown tools {unknown}")
    tools, missing = available_tools(requested)
    bnfold = Bnfold(args.bnfold_src.resolve() if args.bnfold_src else None)
    bnfold.compile()
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)

    # Models + one output at a time (external: data file too), and ORT's copies in memory.
    stack_bytes = layers * 512 * 512 * 9 * 4
    need = 2 * stack_bytes * ("convstack" in model_keys) + 2 * stack_bytes * ("convstack-ext" in model_keys) + 400 * MIB
    free = shutil.disk_usage(workdir).free
    if free < need:
        print(f"bench: {free / 2**30:.1f} GiB free in {workdir}, need about {need / 2**30:.1f} GiB", file=sys.stderr)
        return 2

    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {message}", flush=True)

    versions = child_json([*bnfold.python, TOOLS_PY, "versions", str(workdir / "versions.json")],
                          workdir / "versions.json", env=bnfold.env, cwd=workdir)
    log(f"building models {model_keys} (conv stack: {layers} layers) in {workdir}")
    build_keys = ["zoo", *model_keys] if not args.no_startup else model_keys  # the tiny zoo model drives start-up
    models = child_json([PYTHON, str(BENCH / "models.py"), str(workdir), str(workdir / "models.json"),
                         "--keys", ",".join(dict.fromkeys(build_keys)), "--stack-layers", str(layers)],
                        workdir / "models.json", cwd=workdir)
    tiny = next((Path(m["path"]) for m in models if m["key"] == "zoo"), None)
    models = [m for m in models if m["key"] in model_keys]

    results = {
        "meta": {
            "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "mode": "quick" if args.quick else "full",
            "reps": reps, "warmup": warmup, "stack_layers": layers,
            "machine": machine_info(), "versions": versions, "bnfold": bnfold.describe(),
            "tools": tools, "missing_tools": missing,
            "noisy": "quick mode: few rounds on a shared machine; ratios are indicative only" if args.quick else None,
        },
        "startup": None,
        "models": [],
    }
    if not args.no_startup and tiny is not None and "bnfold" in tools:
        log("start-up and imports")
        results["startup"] = startup(bnfold, workdir, tiny, 2 if args.quick else max(reps, 5), log)
    try:
        for model in models:
            log(f"{model['key']}: {model['title']}, {model['weight_bytes'] / MIB:.0f} MiB of weights")
            entry = dict(model)
            entry["loadavg_before"] = os.getloadavg()
            entry["fold"] = fold_timings(model, tools, bnfold, workdir, reps, warmup, log)
            entry["loadavg_after_fold"] = os.getloadavg()
            folded = workdir / f"{Path(model['path']).stem}.bnfold.onnx"
            if not args.no_latency and folded.exists():
                log(f"  {model['key']}: verify and ORT latency")
                entry["verify"] = verify(model, folded, bnfold, workdir)
                try:
                    entry["latency"] = latency(model, folded, bnfold, workdir, latency_runs,
                                               3 if args.quick else 5, creations, 2)
                except RuntimeError as exc:
                    entry["latency"] = {"error": str(exc)}
            remove_output(folded)
            results["models"].append(entry)
            if model["key"] != "zoo" and not args.keep:  # free the disk as we go
                remove_output(Path(model["path"]))
    finally:
        results["meta"]["total_s"] = time.perf_counter() - started
        results["meta"]["loadavg_at_end"] = os.getloadavg()
        results["targets"] = targets(results)
        (args.results / "latest.json").write_text(json.dumps(results, indent=1) + "\n")
        (args.results / "latest.md").write_text(markdown(results))
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    log(f"wrote {args.results / 'latest.md'} and latest.json")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
