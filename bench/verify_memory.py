"""Peak memory and wall time of ``bnfold verify`` against a bare three-session script.

``python bench/verify_memory.py [--reps 3] [--models convstack24,big] [--workdir bench/work-verify]``

Models (built here, nothing downloaded):

- ``convstack24``: 24 x (Conv 3x3 512->512 + BN + Relu), 216 MiB of weights, embedded
  (``bench/models.py``'s convstack);
- ``big``: the 2.25 GiB external-data model of tests/test_large.py (9 x Conv 1x1
  8192->8192 + BN, weights in one sparse file).

Each model is folded once; then, alternating, ``bnfold verify ORIGINAL FOLDED --providers
cpu -q`` (a process tree: the CLI and its onnxruntime child) and two bare scripts, each one
process creating, running and releasing the same three onnxruntime sessions, in the same
order, on the same random input:

- ``bare``: onnxruntime given the model paths, the way a user's script would (the target's
  baseline);
- ``bare-mapped``: onnxruntime given what verify's worker gets (large embedded weights
  mapped from the model file, ``bnfold/verification/mapped.py``, and the worker's malloc
  settings, ``runner.child_environment``): verify's own overhead is the difference.
 Peak RSS of a tree is the largest sum of the RSS of its
live processes, sampled every 10 ms from /proc (``ru_maxrss`` would carry the
benchmark's own high-water mark across fork+exec); wall is the whole command. Medians over ``--reps`` rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from bnfold.verification.runner import child_environment  # noqa: E402

from tools import BARE_VERIFY as BARE  # noqa: E402


def _tree_rss(root: int) -> int:
    """Sum of the RSS of ``root`` and its descendants (/proc/PID/task/*/children)."""
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        try:
            with open(f"/proc/{pid}/statm") as handle:
                total += int(handle.read().split()[1]) * PAGE
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as handle:
                    stack += [int(child) for child in handle.read().split()]
        except (OSError, ValueError):
            continue
    return total


PAGE = os.sysconf("SC_PAGE_SIZE")


def measure(command: list[str], environment: dict | None = None) -> tuple[float, int]:
    """(wall seconds, peak tree RSS bytes) of ``command``."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=environment)
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss(process.pid))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    stderr = process.stderr.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed: {stderr[-2000:]}")
    # Not ru_maxrss: Linux carries the forking process's high-water mark across fork+exec.
    return wall, peak[0]


def build_convstack(folder: Path) -> tuple[Path, int, str]:
    import onnx
    from models import convstack

    proto, builder = convstack(layers=24)
    path = folder / "convstack24.onnx"
    onnx.save(proto, str(path))
    shape = [d.dim_value or 1 for d in proto.graph.input[0].type.tensor_type.shape.dim]
    return path, builder.weight_bytes, "x".join(map(str, shape))


def build_big(folder: Path) -> tuple[Path, int, str]:
    from test_large import CHANNELS, build_big_model

    _, weight_bytes = build_big_model(folder)
    return folder / "big.onnx", weight_bytes, f"1x{CHANNELS}x1x1"


BUILDERS = {"convstack24": build_convstack, "big": build_big}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--models", default="convstack24,big")
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "work-verify")
    parser.add_argument("--build", nargs=2, metavar=("KEY", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--map", nargs=3, metavar=("ORIGINAL", "FOLDED", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        path, weight_bytes, shape = BUILDERS[args.build[0]](Path(args.build[1]))
        print(path, weight_bytes, shape)
        return 0
    if args.map:
        import pickle

        from bnfold.load import load_source
        from bnfold.verification.mapped import mapped_model

        Path(args.map[2]).write_bytes(pickle.dumps(
            {path: mapped_model(load_source(path, infer_shapes=False)) for path in args.map[:2]}))
        return 0
    rows = []
    for key in args.models.split(","):
        folder = args.workdir / key
        folder.mkdir(parents=True, exist_ok=True)
        # built in a child: this process stays small (and its RSS out of the measured trees)
        built = subprocess.run([sys.executable, __file__, "--build", key, str(folder)], check=True,
                               capture_output=True, text=True).stdout.split()
        original, weight_bytes, shape = Path(built[0]), int(built[1]), built[2]
        folded = folder / "folded.onnx"
        subprocess.run([sys.executable, "-m", "bnfold", "fold", str(original), "-o", str(folded), "-q"], check=True)
        mapped = folder / "mapped.pickle"
        subprocess.run([sys.executable, __file__, "--map", str(original), str(folded), str(mapped)], check=True)
        commands = {
            "verify": ([sys.executable, "-m", "bnfold", "verify", str(original), str(folded), "--providers", "cpu",
                        "-q"], None),
            "bare": ([sys.executable, "-c", BARE, str(original), str(folded), shape], None),
            "bare-mapped": ([sys.executable, "-c", BARE, str(original), str(folded), shape, str(mapped)],
                            child_environment()),
        }
        results = {name: [] for name in commands}
        for _ in range(args.reps):
            for name, (command, environment) in commands.items():
                results[name].append(measure(command, environment))
                print(key, name, f"wall {results[name][-1][0]:.2f} s, peak {results[name][-1][1] / 2**20:.0f} MiB",
                      flush=True)
        med = {name: (statistics.median(w for w, _ in runs), statistics.median(r for _, r in runs))
               for name, runs in results.items()}
        rows.append((key, weight_bytes, med))
        for path in folder.iterdir():
            path.unlink()
    print()
    print("| model | weights | verify wall | bare wall | wall ratio (target <= 1.1) | bare-mapped wall | "
          "verify peak RSS | bare peak RSS | bare-mapped peak RSS | verify peak / weights (target <= 2.5) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key, weight_bytes, med in rows:
        (vw, vr), (bw, br), (mw, mr) = med["verify"], med["bare"], med["bare-mapped"]
        print(f"| {key} | {weight_bytes / 2**20:.0f} MiB | {vw:.2f} s | {bw:.2f} s | {vw / bw:.2f} | {mw:.2f} s | "
              f"{vr / 2**20:.0f} MiB | {br / 2**20:.0f} MiB | {mr / 2**20:.0f} MiB | {vr / weight_bytes:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
