"""bnfold depends on no onnxruntime build (bnfold/runtime.py). These tests run the real CLI
in an environment built from this one's site-packages with onnxruntime left out, and
with a second build's metadata beside the first (the state pip leaves after installing
both), not with patched imports."""

from __future__ import annotations

import json
import os
import re
import site
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _models import ConvBnParams, conv_bn_model, save

ROOT = Path(__file__).resolve().parents[1]


def _environment(folder: Path, *, without: tuple[str, ...] = (), extra: dict[str, str] | None = None) -> dict:
    """PYTHONPATH for ``python -S``: every entry of site-packages, linked, except those
    starting with a name in ``without``; plus ``extra`` dist-info folders (name -> version)."""
    packages = folder / "site"
    packages.mkdir(parents=True)
    for source in site.getsitepackages():
        for entry in Path(source).iterdir():
            if entry.name.lower().startswith(without) or (packages / entry.name).exists():
                continue
            (packages / entry.name).symlink_to(entry)
    for name, version in (extra or {}).items():
        info = packages / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{packages}"}


def _bnfold(environment: dict, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-S", "-m", "bnfold", *map(str, args)], env=environment,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def model(tmp_path):
    params = ConvBnParams.random(np.random.default_rng(0), 4, 3, (3, 3))
    return save(conv_bn_model(params), tmp_path / "model.onnx")


def test_without_onnxruntime_fold_works_and_verify_names_both_builds(tmp_path, model):
    environment = _environment(tmp_path, without=("onnxruntime",))
    probe = subprocess.run([sys.executable, "-S", "-c", "import onnxruntime"], env=environment,
                           capture_output=True, text=True)
    assert probe.returncode != 0, "the environment should have no onnxruntime"

    folded = tmp_path / "folded.onnx"
    assert _bnfold(environment, "fold", model, "-o", folded, "-q").returncode == 0
    assert folded.exists()

    for args in (("verify", model, folded), ("fold", model, "-o", tmp_path / "again.onnx", "--verify"),
                 ("recalibrate", model, "--data", tmp_path / "none.npz", "-o", tmp_path / "r.onnx")):
        result = _bnfold(environment, *args)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert "not installed" in lines[0] and "pip install '.[cpu]'" in lines[0] and "onnxruntime-gpu" in lines[0]
    assert not (tmp_path / "again.onnx").exists() and not (tmp_path / "r.onnx").exists()


def test_both_builds_installed_is_a_note_in_the_report(tmp_path, model):
    environment = _environment(tmp_path, extra={"onnxruntime-gpu": "1.32.0"})
    result = _bnfold(environment, "verify", model, model, "--json", "-", "-q")
    assert result.returncode == 0, result.stderr
    notes = json.loads(result.stdout)["notes"]
    assert any("both onnxruntime and onnxruntime-gpu are installed" in note for note in notes), notes

    alone = _bnfold(_environment(tmp_path / "alone", without=()), "verify", model, model, "--json", "-", "-q")
    assert not any("both" in note for note in json.loads(alone.stdout)["notes"])


def test_install_hints_are_the_readme_install_commands():
    """Every extra a hint tells the user to install is spelled as the README installs it,
    from a clone (``pip install '.[gpu]'``): bnfold is not installed from an index."""
    from bnfold._ort_worker import CPU, CUDA, _unavailable_message
    from bnfold.runtime import INSTALL_HINT
    from bnfold.train import INSTALL_HINT as TRAIN_HINT

    readme = (ROOT / "README.md").read_text()
    hints = {"onnxruntime missing": INSTALL_HINT, "CUDA missing": _unavailable_message(CUDA, [CPU]),
             "torch missing": TRAIN_HINT}
    for what, hint in hints.items():
        extras = re.findall(r"'(\S*)\[(\w+)\]'", hint)
        assert extras, (what, hint)
        for prefix, extra in extras:
            assert prefix == ".", (what, hint)  # not 'bnfold[gpu]'
            assert re.search(rf"pip install (-e )?'\.\[([\w,]*,)?{extra}(,[\w,]*)?\]'", readme), (what, extra)
