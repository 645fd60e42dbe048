"""The documented vocabularies match the code, so users can rely on the docs."""

from pathlib import Path

from bnfold.health import PROBLEMS
from bnfold.ledger import REASONS
from bnfold.precision import PROBLEMS as PRECISION_PROBLEMS

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_every_ledger_reason_and_inspect_problem_is_documented():
    text = (DOCS / "ledger.md").read_text()
    missing = [code for code in [*REASONS, *PROBLEMS, *PRECISION_PROBLEMS] if f"| `{code}` |" not in text]
    assert missing == []
    precision = (DOCS / "precision.md").read_text()
    assert [code for code in PRECISION_PROBLEMS if f"`{code}`" not in precision] == []


# --- the documentation's Python examples run as written ----------------------------------------------


import re
import shutil
import subprocess
import sys

import pytest

ROOT = DOCS.parent
DOCUMENTS = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
BLOCKS = [(doc, index, code) for doc in DOCUMENTS
          for index, code in enumerate(re.findall(r"```python\n(.*?)```", doc.read_text(), re.S))]


@pytest.mark.parametrize("doc, index, code", BLOCKS, ids=[f"{d.name}-{i}" for d, i, _ in BLOCKS])
def test_python_examples_run(tmp_path, doc, index, code):
    """Each ```python block runs in a fresh interpreter, in a folder holding what examples
    name: model.onnx (the README's default model), data.npz (its inputs), model.folded.onnx,
    torch.npz (reference outputs for those inputs) and models/."""
    import bnfold
    import numpy as np
    import onnxruntime as ort

    shutil.copy(ROOT / "models" / "cnn_ts13.onnx", tmp_path / "model.onnx")
    shutil.copy(ROOT / "models" / "cnn_ts13.npz", tmp_path / "data.npz")
    (tmp_path / "models").symlink_to(ROOT / "models")
    bnfold.fold(tmp_path / "model.onnx").save(tmp_path / "model.folded.onnx")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = dict(np.load(tmp_path / "data.npz"))
    names = [o.name for o in session.get_outputs()]
    np.savez(tmp_path / "torch.npz", **dict(zip(names, session.run(None, feeds))))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{doc.name} block {index}:\n{code}\n{result.stderr[-2000:]}"


# --- the README's command synopsis is what the commands take ------------------------------------------


def readme_synopsis() -> dict[str, set[str]]:
    """Each command of the README's Commands block and the options its lines name."""
    text = (ROOT / "README.md").read_text().split("## Commands\n", 1)[1]
    (block,) = re.findall(r"```text\n(.*?)```", text.split("\n## ", 1)[0], re.S)
    commands: dict[str, set[str]] = {}
    current = None
    for line in block.splitlines():
        words = line.split()
        if line.startswith("bnfold "):
            current = None if words[1].startswith("-") else words[1]
            line = " ".join(words[2:])
        if current is not None:
            commands.setdefault(current, set()).update(re.findall(r"(?<![\w-])(--[a-z0-9-]+|-[a-z])\b", line))
    return commands


def test_the_readme_synopsis_names_only_options_the_commands_take():
    from cli_runner import invoke

    synopsis = readme_synopsis()
    assert set(synopsis) == {"fold", "inspect", "verify", "recalibrate", "train"}
    for command, options in synopsis.items():
        help_text = invoke(command, "--help").stdout
        missing = [o for o in options if not re.search(rf"(?<![\w-]){re.escape(o)}\b", help_text)]
        assert not missing, (command, missing)
    for command in ("fold", "inspect", "verify", "recalibrate"):  # README: these take --json FILE|- and --junit
        assert {"--json", "--junit"} <= synopsis[command], command
