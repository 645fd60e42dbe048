"""A/B of two ways to run ``bnfold fold``: ``python bench/ab.py [--baseline DIR] [--args ...]``.

Answers "what does this change cost?" on the bench models (``bench/models.py``): side A is
this checkout, side B the bnfold package under ``--baseline`` (a ``git worktree`` of
another commit; default: this checkout too), each with its own extra fold arguments
(``--args``, ``--baseline-args``: e.g. ``--args "--target fp16"`` against no flags).
The models and the outputs live in ``--workdir``; on a tmpfs (``--workdir /dev/shm/ab``)
the disk's flush, which varies from run to run, neither hides a cost nor adds noise.
Every fold is its own child process, the two sides alternating in a rotating order;
wall time and peak RSS are medians, and A/B ratios the medians of per-round ratios, so a
slow spell of the machine hits both sides of each ratio alike. Writes
``bench/results/ab-NAME.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

from run import BENCH, PYTHON, Bnfold, child_json, machine_info, median, paired_ratio, remove_output, rotated, \
    run_child

MIB = 2**20


def side(label: str, src: Path | None, extra: list[str]) -> dict:
    bnfold = Bnfold(src)
    bnfold.compile()
    return {"label": label, "bnfold": bnfold, "args": extra}


def measure(model: dict, sides: list[dict], workdir: Path, reps: int, warmup: int, log) -> dict:
    src = Path(model["path"])
    samples = {s["label"]: {"wall_s": [], "maxrss_bytes": []} for s in sides}
    for round_ in range(warmup + reps):
        for s in rotated(sides, round_):
            out = workdir / f"{src.stem}.{s['label']}.onnx"
            remove_output(out)
            run = run_child([*s["bnfold"].cmd, "fold", str(src), "-o", str(out), "-q", *s["args"]],
                            env=s["bnfold"].env, cwd=workdir)
            remove_output(out)
            if not run.ok:
                raise RuntimeError(f"{model['key']}: side {s['label']} failed (exit {run.code}): {run.stderr[-300:]}")
            if round_ >= warmup:
                samples[s["label"]]["wall_s"].append(run.wall)
                samples[s["label"]]["maxrss_bytes"].append(run.maxrss)
        log(f"  {model['key']} round {round_ + 1}/{warmup + reps}")
    a, b = (samples[s["label"]] for s in sides)
    return {
        "samples": samples,
        "wall_s_median": {k: median(v["wall_s"]) for k, v in samples.items()},
        "maxrss_mib_median": {k: median(v["maxrss_bytes"]) / MIB for k, v in samples.items()},
        "wall_a_over_b": paired_ratio(a["wall_s"], b["wall_s"]),
        "rss_a_over_b": paired_ratio(a["maxrss_bytes"], b["maxrss_bytes"]),
    }


def filesystem(path: Path) -> str:
    """The type of the filesystem ``path`` lies on (Linux), e.g. tmpfs or ext4."""
    best, kind = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, fstype, *_ = line.split()
            if (str(path) + "/").startswith(mount.rstrip("/") + "/") and len(mount) >= len(best):
                best, kind = mount, fstype
    except OSError:
        pass
    return kind


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [f"# A/B: {meta['name']}", "",
             f"{meta['date']}; {meta['machine'].get('cpu', '')}, {meta['machine'].get('cores', '?')} cores; "
             f"{meta['reps']} rounds (+{meta['warmup']} warm-up), sides alternating.", "",
             f"- A: `{meta['a']}`", f"- B: `{meta['b']}`", f"- models and outputs in `{meta['workdir']}`", "",
             "| model | A s | B s | A/B wall | A MiB | B MiB | A/B peak RSS |", "|---|---|---|---|---|---|---|"]
    for key, r in results["models"].items():
        wa, wb = r["wall_s_median"]["A"], r["wall_s_median"]["B"]
        ra, rb = r["maxrss_mib_median"]["A"], r["maxrss_mib_median"]["B"]
        lines.append(f"| {key} | {wa:.3f} | {wb:.3f} | {r['wall_a_over_b']:.3f} | {ra:.0f} | {rb:.0f} | "
                     f"{r['rss_a_over_b']:.3f} |")
    lines += ["", f"Load average at the start {meta['loadavg_start']}, at the end {meta['loadavg_end']}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, help="bnfold source folder of side B (default: this checkout)")
    parser.add_argument("--args", default="", help="extra `bnfold fold` arguments of side A")
    parser.add_argument("--baseline-args", default="", help="extra `bnfold fold` arguments of side B")
    parser.add_argument("--models", default="resnet50,convstack,mlp,zoo")
    parser.add_argument("--stack-layers", type=int, default=40)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--name", default="latest", help="results go to bench/results/ab-NAME.md/.json")
    parser.add_argument("--workdir", type=Path, default=BENCH / "work-ab")
    args = parser.parse_args(argv)

    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {message}", flush=True)

    sides = [side("A", BENCH.parent, shlex.split(args.args)),
             side("B", args.baseline.resolve() if args.baseline else BENCH.parent, shlex.split(args.baseline_args))]
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    keys = [k for k in args.models.split(",") if k]
    models = child_json([PYTHON, str(BENCH / "models.py"), str(workdir), str(workdir / "models.json"),
                         "--keys", ",".join(keys), "--stack-layers", str(args.stack_layers)],
                        workdir / "models.json", cwd=workdir)
    import os

    results = {"meta": {"name": args.name, "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                        "machine": machine_info(), "reps": args.reps, "warmup": args.warmup,
                        "a": " ".join([sides[0]["bnfold"].describe(), *sides[0]["args"]]),
                        "b": " ".join([sides[1]["bnfold"].describe(), *sides[1]["args"]]),
                        "loadavg_start": os.getloadavg(), "workdir": f"{workdir} ({filesystem(workdir)})"},
               "models": {}}
    try:
        for model in models:
            log(f"{model['key']}: {model['title']}")
            results["models"][model["key"]] = measure(model, sides, workdir, args.reps, args.warmup, log)
    finally:
        results["meta"]["loadavg_end"] = os.getloadavg()
        shutil.rmtree(workdir, ignore_errors=True)
    out = BENCH / "results"
    (out / f"ab-{args.name}.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / f"ab-{args.name}.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
