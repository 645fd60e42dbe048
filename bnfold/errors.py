"""Errors and exit codes shared by the library and the CLI.

The CLI turns every ``BnfoldError`` into one line on stderr and its ``exit_code``;
anything else escaping is a bug.
"""

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2


class BnfoldError(Exception):
    """A problem the user can act on; carries the exit code the CLI returns."""

    exit_code = EXIT_BAD_INPUT


class InputError(BnfoldError):
    """The input (file, model, option) is unusable: exit 2."""

    exit_code = EXIT_BAD_INPUT
