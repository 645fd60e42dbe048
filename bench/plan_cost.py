"""What planning costs: ``python bench/plan_cost.py --baseline DIR``.

Times, on the bench models (``bench/models.py``), bnfold's planning and rewriting
(``engine.run``: every site planned and rewritten, the passes until nothing more folds)
for this checkout (A) and the bnfold under ``--baseline`` (B, a ``git worktree`` of an
older commit), each in its own child process, the two alternating, and the whole fold
(``fold`` + ``save``) of A, all medians of ``--reps`` runs. The difference A - B is what
A's extra proofs cost (routes, merges); the report gives it as a share of A's fold.
Writes ``bench/results/plan-cost.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from run import BENCH, PYTHON, child_json, machine_info

#: Runs in the child: the median seconds of ``engine.run`` and of ``fold`` + ``save``.
CHILD = r"""
import json, statistics, sys, tempfile, time
from pathlib import Path
import bnfold
from bnfold.engine import run
from bnfold.load import load_source
path, reps, report = sys.argv[1], int(sys.argv[2]), sys.argv[3]
plan, whole = [], []
for _ in range(reps):
    source = load_source(path)
    start = time.perf_counter(); run(source); plan.append(time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        bnfold.fold(path).save(Path(folder) / "out.onnx")
        whole.append(time.perf_counter() - start)
Path(report).write_text(json.dumps({"plan_s": statistics.median(plan), "fold_s": statistics.median(whole)}))
"""


def measure(src: Path, model: Path, reps: int, workdir: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src))
    report = workdir / "plan.json"
    subprocess.run([PYTHON, "-P", "-c", CHILD, str(model), str(reps), str(report)], env=env, check=True,
                   cwd=workdir)
    return json.loads(report.read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, required=True, help="bnfold source folder of side B")
    parser.add_argument("--models", default="resnet50,convstack,mlp,zoo")
    parser.add_argument("--stack-layers", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (each a child per side)")
    parser.add_argument("--reps", type=int, default=3, help="runs per child")
    parser.add_argument("--workdir", type=Path, default=BENCH / "work-plan")
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    models = child_json([PYTHON, str(BENCH / "models.py"), str(workdir), str(workdir / "models.json"), "--keys",
                         args.models, "--stack-layers", str(args.stack_layers)], workdir / "models.json", cwd=workdir)
    sides = {"A": BENCH.parent, "B": args.baseline.resolve()}
    rows = {}
    try:
        for model in models:
            samples = {"A": [], "B": []}
            for round_ in range(args.rounds):
                for side in (["A", "B"] if round_ % 2 == 0 else ["B", "A"]):
                    samples[side].append(measure(sides[side], Path(model["path"]), args.reps, workdir))
            plan = {side: statistics.median(s["plan_s"] for s in samples[side]) for side in sides}
            fold = statistics.median(s["fold_s"] for s in samples["A"])
            rows[model["key"]] = {"plan_a_s": plan["A"], "plan_b_s": plan["B"], "fold_a_s": fold,
                                  "extra_share": (plan["A"] - plan["B"]) / fold}
            print(f"{model['key']}: plan A {plan['A']:.3f} s, B {plan['B']:.3f} s, fold A {fold:.3f} s, "
                  f"extra {100 * rows[model['key']]['extra_share']:+.1f}% of a fold", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    meta = {"machine": machine_info(), "a": str(sides["A"]), "b": str(sides["B"]), "rounds": args.rounds,
            "reps": args.reps}
    (BENCH / "results" / "plan-cost.json").write_text(json.dumps({"meta": meta, "models": rows}, indent=1) + "\n")
    lines = ["# What planning costs", "",
             f"A: `{meta['a']}`, B: `{meta['b']}`; {meta['machine']['cpu']}, {meta['machine']['cores']} cores; "
             f"medians of {args.rounds} alternating rounds x {args.reps} runs, in-process.", "",
             "| model | plan+rewrite A s | plan+rewrite B s | fold+save A s | (A - B) / fold A |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {r['plan_a_s']:.3f} | {r['plan_b_s']:.3f} | {r['fold_a_s']:.3f} | {100 * r['extra_share']:+.1f}% |"
              for k, r in rows.items()]
    (BENCH / "results" / "plan-cost.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
