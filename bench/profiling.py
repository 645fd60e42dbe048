"""Where ``bnfold fold`` spends its time: ``python bench/profiling.py MODEL [--cprofile N]``.

Runs the CLI's fold in this process and reports wall-clock phases measured by wrapping
the functions involved at run time (nothing in ``bnfold/`` is changed): imports, load
(the wire scan that leaves large weights in the file, protobuf parse of the rest,
checks, onnx_ir deserialisation), the graph rewrite, and the save (graph serialisation,
weights copied or folded and written, fsync). Phases are inclusive and may nest, e.g.
``write`` runs inside ``save``; folding runs on worker threads, so its total overlaps
the writes. A wrapped name that no longer exists is reported as absent, not as an error.

With ``--cprofile N`` it also prints cProfile's top N entries by cumulative and by own
time (cProfile inflates import and many-small-call costs; trust the phases for totals).
Not named ``profile.py``: that would shadow the standard library module cProfile uses.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

TOTALS: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)
ABSENT: list[str] = []
LOCK = threading.Lock()


def wrap(module_name: str, attr: str, label: str) -> None:
    """Accumulate the wall time of ``module.attr`` under ``label`` (outermost call only)."""
    try:
        module = importlib.import_module(module_name)
        original = getattr(module, attr)
    except (ImportError, AttributeError):
        ABSENT.append(f"{module_name}.{attr}")
        return
    depth = threading.local()  # the fold runs on worker threads: nesting is per thread

    @functools.wraps(original)
    def timed(*args, **kwargs):
        depth.n = getattr(depth, "n", 0) + 1
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            depth.n -= 1
            if depth.n == 0:
                with LOCK:
                    TOTALS[label] += time.perf_counter() - start
                    CALLS[label] += 1

    setattr(module, attr, timed)


PHASES = [
    # (module, attribute, label); the module must be the one the caller looks the name up in.
    ("bnfold.load", "load_source", "load (all)"),
    ("bnfold.wire", "split_weights", "  cut large weights out (wire scan)"),
    ("onnx", "load", "  onnx.load (whole-file parse: fallback)"),
    ("bnfold.load", "_check_tensors", "  check tensors"),
    ("bnfold.load", "_check_external_data", "  check external data"),
    ("bnfold.load", "_check_opsets", "  check opsets/nodes"),
    ("onnx_ir.serde", "deserialize_model", "  onnx_ir deserialise"),
    ("bnfold.load", "check_graph_wellformed", "  check well-formed"),
    ("bnfold.engine", "fold", "fold() (graph work; loads too if given a path)"),
    ("bnfold.engine", "plan_site", "  plan (all sites)"),
    ("bnfold.engine", "run", "  plan+rewrite (all nodes)"),
    ("bnfold.engine", "apply_edits", "  carry the edits over to the proto"),
    ("bnfold.engine", "save_edited", "save (all)"),
    ("bnfold.save", "_Layout", "  lay out tensors (copy of the proto)"),
    ("bnfold.affine", "apply_factor", "    fold weights (worker threads, overlaps writing)"),
    ("bnfold.stream", "_copy_from_file", "    copy weights file to file"),
    ("bnfold.stream", "_write_all", "    write (incl. waiting for folded weights)"),
    ("bnfold.save", "_fsync", "  fsync files"),
    ("bnfold.save", "_fsync_dir", "  fsync folder"),
    ("bnfold.render", "render_ledger", "render ledger"),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--cprofile", type=int, metavar="N", help="also print cProfile's top N entries")
    parser.add_argument("--sort", default="cumulative,tottime")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    import bnfold.cli  # noqa: F401  (what `bnfold --help` pays)

    t_cli = time.perf_counter() - start
    import bnfold.engine  # noqa: F401  (onnx, onnx_ir, numpy: what a fold pays on top)

    t_engine = time.perf_counter() - start - t_cli
    for module, attr, label in PHASES:
        wrap(module, attr, label)

    with tempfile.TemporaryDirectory(dir=args.model.resolve().parent, prefix=".bnfold-profile.") as tmp:
        out = Path(tmp) / "folded.onnx"
        sys.argv = ["bnfold", "fold", str(args.model), "-o", str(out), "-q"]
        profiler = None
        if args.cprofile:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        t0 = time.perf_counter()
        try:
            bnfold.cli.main()
        except SystemExit as exc:
            if exc.code not in (0, None):
                print(f"bnfold fold exited {exc.code}", file=sys.stderr)
                return 1
        t_fold = time.perf_counter() - t0
        if profiler:
            profiler.disable()
        size = sum(f.stat().st_size for f in Path(tmp).iterdir() if f.is_file())

    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"model {args.model} -> {size / 2**20:.1f} MiB written; peak RSS {rss / 2**20:.0f} MiB")
    print(f"{'import bnfold.cli':44s} {t_cli:7.3f} s")
    print(f"{'import bnfold.engine (onnx, onnx_ir, numpy)':44s} {t_engine:7.3f} s")
    print(f"{'CLI fold command (below, inclusive)':44s} {t_fold:7.3f} s")
    for label in dict.fromkeys(lbl for _, _, lbl in PHASES):
        if label in TOTALS:
            print(f"{label:44s} {TOTALS[label]:7.3f} s  ({CALLS[label]} call{'s' if CALLS[label] != 1 else ''})")
    if ABSENT:
        print("not wrapped (absent in this version): " + ", ".join(ABSENT))
    if profiler:
        import pstats

        for key in args.sort.split(","):
            print(f"\n--- cProfile, top {args.cprofile} by {key} ---")
            pstats.Stats(profiler).sort_stats(key).print_stats(args.cprofile)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("BNFOLD_DEBUG", "1")
    raise SystemExit(main())
