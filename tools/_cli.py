"""What the command-line tools share: the repository on sys.path and one way to end.

The tools are run as scripts (`python tools/pack_rec.py ...`, the command lines
users know), so Python puts `tools/` on sys.path, not the repository root that
holds `utils/`, `dataset/`, `eval/`, ... Every tool imports this module first
(`from _cli import run_main`), and this is the one place that adds the root.
(Making `tools/` a package would change those command lines to `python -m tools.x`.)

`run_main(main)` is the exit convention of every entry point: a
`utils.errors.UserError` (bad config, data, checkpoint, verification set, model
file or argument) is printed as one line `error: ...` on stderr and the process
exits with `EXIT_USER_ERROR` (2, the code argparse uses for a bad command line);
any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from utils.errors import EXIT_USER_ERROR, UserError  # noqa: E402  (needs the path above)

__all__ = ["EXIT_USER_ERROR", "REPO_ROOT", "UserError", "run_main"]


def run_main(main: Callable[[], int | None]) -> None:
    """Run `main` and exit: its return code, EXIT_USER_ERROR with one `error:` line for input
    errors, 130 on Ctrl-C."""
    try:
        code = main()
    except UserError as e:
        _fail(str(e))
    except FileNotFoundError as e:  # a path from the command line that does not exist
        _fail(str(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # output piped into `head` and friends
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    sys.exit(code or 0)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)
