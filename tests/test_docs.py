"""The documented vocabularies match the code, so users can rely on the docs."""

from pathlib import Path

from bnfold.health import PROBLEMS
from bnfold.ledger import REASONS

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_every_ledger_reason_and_inspect_problem_is_documented():
    text = (DOCS / "ledger.md").read_text()
    missing = [code for code in [*REASONS, *PROBLEMS] if f"| `{code}` |" not in text]
    assert missing == []
