"""One way for every command line to turn a user's mistake into a message instead of a traceback.

    from microdit.cli import UserError, run_cli

    def main(argv=None) -> None:
        ...
        if a.steps < 1:
            raise UserError(f"--steps {a.steps}: give a positive number of optimizer steps")

    if __name__ == "__main__":
        run_cli(main)

A `UserError` (and a missing file) ends the command with `error: <message>` on stderr and exit code 2;
the message names the file or field and what to do. Anything else is a bug and keeps its traceback.
Set MICRO_BUDGET_DEBUG=1 to see the traceback of a user error too. Messages and every log record of the
command have URL query strings redacted (`microdit.redact`: signed links carry credentials there).
"""
from __future__ import annotations

import os
import sys
import traceback


class UserError(ValueError):
    """A mistake the user can fix (bad flag, missing or malformed input); the message says what to do."""


# Errors that reach a command line from the user's side of the table: the message is the whole story.
USER_ERRORS = (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def check_positive(**values) -> None:
    """Refuse the first value that is set and below 1, naming its flag (`batch_size=...` -> --batch-size)."""
    for name, v in values.items():
        if v is not None and v < 1:
            raise UserError(f"--{name.replace('_', '-')} {v}: give a positive number")


def one_line(message: object) -> str:
    """The message folded onto one line (multi-line library errors keep their first two lines)."""
    lines = [ln.strip() for ln in str(message).strip().splitlines() if ln.strip()]
    return " ".join(lines[:2]) if lines else type(message).__name__


def run_cli(main, argv=None, extra_user_errors: tuple = ()) -> None:
    """Run `main(argv)` and exit with its return code (None = 0); a user error exits 2 with one line on
    stderr, Ctrl-C exits 130."""
    from .redact import install_log_redaction, redact
    install_log_redaction()
    sys.excepthook = lambda *exc: sys.stderr.write(redact("".join(traceback.format_exception(*exc))))
    try:
        code = main(argv)
    except USER_ERRORS + tuple(extra_user_errors) as e:
        if os.environ.get("MICRO_BUDGET_DEBUG"):
            raise
        print(f"error: {redact(one_line(e))}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; rerun the same command to continue", file=sys.stderr)
        raise SystemExit(130) from None
    if isinstance(code, int) and code:
        raise SystemExit(code)
