"""Folding many models in one call: ``bnfold fold DIR... --out-dir OUT [--jobs N]``.

One process pays bnfold's start-up (imports of onnx, onnx_ir, numpy) once for the whole
folder instead of once per model; ``--jobs`` folds that many models at once in worker
processes. Each model is loaded, folded and saved exactly as ``bnfold fold`` does it
(external data stays with its model), and an unusable model is reported, not fatal.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bnfold.errors import EXIT_BAD_INPUT, BnfoldError, InputError

#: Exit code of a model whose fold raised something unexpected (a bug).
EXIT_INTERNAL = 3


@dataclass
class Folded:
    """The outcome of one model: its ledger, or the one-line error that stopped it."""

    model: Path
    output: Path
    ledger: object | None = None
    error: str | None = None
    exit_code: int = 0
    #: Bytes on disk of the model and of its output, each with its external data.
    sizes: tuple[int | None, int | None] | None = None


def plan_outputs(roots: list[Path], models: list[Path], out_dir: Path) -> list[tuple[Path, Path]]:
    """Each model's output under ``out_dir``: its path relative to the folder it was found
    in, or its file name. Two models may not land on one output, nor on an input."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: --out-dir is not a folder")
    tasks, taken = [], {}
    inputs = {m.resolve(): m for m in models}
    for model in models:
        root = next((r for r in roots if r.is_dir() and r.resolve() in model.resolve().parents), None)
        relative = model.resolve().relative_to(root.resolve()) if root is not None else Path(model.name)
        output = out_dir / relative
        key = output.resolve()
        if key in taken:
            raise InputError(f"{output}: both {taken[key]} and {model} would be folded into it")
        if key in inputs:
            raise InputError(f"{output}: --out-dir would overwrite this input model with the fold of {model}"
                             if inputs[key] != model else f"{output}: --out-dir would overwrite this input model")
        taken[key] = model
        tasks.append((model, output))
    return tasks


def fold_files(tasks: list[tuple[Path, Path]], options, *, embed: bool, jobs: int) -> Iterator[Folded]:
    """Fold each (model, output) pair, in order; ``jobs`` > 1 folds in worker processes."""
    work = [(model, output, options, embed) for model, output in tasks]
    if jobs <= 1 or len(work) <= 1:
        yield from map(fold_file, work)
        return
    with ProcessPoolExecutor(max_workers=min(jobs, len(work))) as pool:
        yield from pool.map(fold_file, work)


def fold_file(task: tuple[Path, Path, object, bool]) -> Folded:
    """Load, fold and save one model; errors become the result, never an exception."""
    from bnfold.engine import fold
    from bnfold.load import disk_size, external_data_files, has_external_data, load_source

    model, output, options, embed = task
    try:
        source = load_source(model)
        if output.resolve() in external_data_files(source) | {model.resolve()}:
            raise InputError(f"{output}: would overwrite the input model {model} or its external data")
        output.parent.mkdir(parents=True, exist_ok=True)
        external = None if embed or not has_external_data(source) else f"{output.name}.data"
        size_before = disk_size([model, *external_data_files(source)])  # the fold edits source
        result = fold(source, options)
        result.save(output, external_data=False if embed else external)
        written = [output, *(output.parent / name for name in [external] if name)]
        sizes = (size_before, disk_size(written))
        return Folded(model, output, ledger=result.ledger, sizes=sizes)
    except BnfoldError as exc:
        text = str(exc)
        return Folded(model, output, error=text if text.startswith(f"{model}:") else f"{model}: {text}",
                      exit_code=exc.exit_code)
    except OSError as exc:
        return Folded(model, output, error=f"{model}: {exc.strerror or exc}", exit_code=EXIT_BAD_INPUT)
    except Exception as exc:  # a bug in one model must not lose the others' results
        if os.environ.get("BNFOLD_DEBUG"):
            raise
        return Folded(model, output, error=f"{model}: internal error: {type(exc).__name__}: {exc}",
                      exit_code=EXIT_INTERNAL)
