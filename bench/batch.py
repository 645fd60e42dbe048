"""Folding a folder of models in one call against one ``bnfold`` process per model.

``python bench/batch.py [--rounds 3] [--jobs 2]`` builds a folder of 32 models: the 22
trained zoo models of ``models/`` (real exporter output) and 10 synthetic Conv+BN stacks of
1-6 MiB (bench/models.py), then times, alternating, in fresh processes:

- ``per-process``: ``bnfold fold MODEL -o OUT -q`` for each model, one after another
  (what a shell loop over a model registry does);
- ``one call``: ``bnfold fold FOLDER --out-dir OUT -q --jobs N``.

It prints the medians and their ratio (target: one call <= 0.5x per-process on 2 cores),
and appends nothing by itself: bench/results/latest.md quotes a run.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import models as bench_models  # noqa: E402


def build_folder(folder: Path) -> list[Path]:
    for path in sorted((ROOT / "models").glob("*.onnx")):
        shutil.copy(path, folder / path.name)
    for index in range(10):
        layers, channels = 2 + index % 4, 64 + 32 * (index % 3)
        model, _ = bench_models.convstack(layers=layers, channels=channels, spatial=7, seed=index)
        bench_models._save(model, folder / f"stack{index}.onnx", external=False)
    return sorted(folder.glob("*.onnx"))


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        folder, out = Path(work) / "in", Path(work) / "out"
        folder.mkdir()
        models = build_folder(folder)
        bnfold = [sys.executable, "-m", "bnfold"]
        per_process, one_call = [], []
        for _ in range(args.rounds):
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            per_process.append(sum(timed([*bnfold, "fold", str(m), "-o", str(out / m.name), "-q"]) for m in models))
            shutil.rmtree(out)
            one_call.append(timed([*bnfold, "fold", str(folder), "--out-dir", str(out), "-q", "--jobs", str(args.jobs)]))
        size = sum(m.stat().st_size for m in models) / 2**20
    a, b = statistics.median(per_process), statistics.median(one_call)
    print(f"{len(models)} models, {size:.1f} MiB; medians of {args.rounds} rounds")
    print(f"per-process total {a:.2f} s ({', '.join(f'{t:.2f}' for t in per_process)})")
    print(f"one call, --jobs {args.jobs}: {b:.2f} s ({', '.join(f'{t:.2f}' for t in one_call)})")
    print(f"ratio one call / per-process: {b / a:.2f} (target <= 0.5)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
