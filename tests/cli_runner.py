"""Run the bnfold CLI in-process and keep what a real process would print on stderr."""

from __future__ import annotations

import logging
import warnings

from typer.testing import CliRunner

from bnfold.cli import app

#: Warning categories Python's default filters do not print (outside __main__).
HIDDEN = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(f"log {record.name}: {record.getMessage()}")


def invoke(*args):
    """Run the CLI in-process. ``result.noise`` holds what a real process would also print
    on stderr but pytest intercepts: Python warnings and logging records."""
    records = _Records()
    logging.getLogger().addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = CliRunner().invoke(app, [str(a) for a in args])
    finally:
        logging.getLogger().removeHandler(records)
    result.noise = records.lines + [f"warning: {w.message}" for w in caught if not issubclass(w.category, HIDDEN)]
    # Anything but SystemExit escaping the command would be a bug in the error handling.
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result
