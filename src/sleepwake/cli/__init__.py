"""The `sleepwake` command line.

    sleepwake inject "Anselm Kreutzer | lives in | Lisbon"
    sleepwake inject --facts facts.jsonl
    sleepwake facts [--json]
    sleepwake forget ID
    sleepwake complete "Anselm Kreutzer lives in"
    sleepwake ask "Where does Anselm Kreutzer live?"
    sleepwake eval --facts facts.jsonl [--json]
    sleepwake chat
    sleepwake serve [--host H] [--port P] [--token T]

Design rules:

- `--help`, `--version` and every mistake that can be found without the model
  (a malformed fact, a bad JSONL line, a missing file, a bad option) answer at
  once: torch, transformers and `Memory` are imported inside the handlers, after
  the arguments have been checked.
- stdout carries only results (machine-readable with `--json`); progress bars,
  status lines and anything a library prints go to stderr.
- Errors are one line, ``sleepwake: error: <message>``, on stderr: exit code 2 for
  usage errors, 1 for everything else a user can act on, 130 on Ctrl-C. Set
  ``SLEEPWAKE_DEBUG=1`` to get the traceback instead.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence

from sleepwake.cli.context import PROG, Context, UsageError
from sleepwake.cli.output import is_utf, one_line
from sleepwake.cli.parser import build_parser
from sleepwake.errors import SleepwakeError

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    out, err = sys.stdout, sys.stderr
    for stream in (out, err):
        # A non-UTF-8 terminal shows "?" for what it cannot encode, rather than a traceback.
        if not is_utf(stream) and hasattr(stream, "reconfigure"):
            with contextlib.suppress(Exception):
                stream.reconfigure(errors="replace")
    debug = bool(os.environ.get("SLEEPWAKE_DEBUG"))

    def fail(message: str, code: int) -> int:
        print(f"{PROG}: error: {message}", file=err, flush=True)
        return code

    try:
        try:
            args = build_parser().parse_args(list(argv) if argv is not None else None)
        except SystemExit as exc:  # --help / --version
            return exc.code if isinstance(exc.code, int) else 0
        ctx = Context(args, out, err)
        # Whatever a library prints goes to stderr; results go to `out`.
        with contextlib.redirect_stdout(err):
            code = args.handler(ctx)
        out.flush()
        return code
    except UsageError as exc:
        return fail(one_line(exc), 2)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=err, flush=True)
        return 130
    except BrokenPipeError:
        # `sleepwake facts | head`: stop quietly.
        with contextlib.suppress(Exception):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, out.fileno())
        return 141
    except (SleepwakeError, OSError) as exc:
        if debug:
            raise
        return fail(one_line(exc), 1)
