"""What the command-line tools share: the repository on sys.path, user errors as one
line on stderr, and a progress line with rate and ETA."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from utils.log import format_duration  # noqa: E402  (needs the path above)


class UserError(Exception):
    """Bad input the user can fix; printed as one line, no traceback."""


def run_main(main: Callable[[], int | None]) -> None:
    """Run `main`, turning the project's input errors into `error: ...` on stderr and exit code 1."""
    from eval.embedder import EmbedderError
    from dataset.verification_bin import VerificationSetError

    try:
        code = main()
    except (UserError, EmbedderError, VerificationSetError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # output piped into `head` and friends
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    sys.exit(code or 0)


class Progress:
    """`label  done/total  rate/s  ETA m:ss` on stderr, rewritten in place at most every `interval` s."""

    def __init__(self, label: str, total: int, unit: str = "img", interval: float = 0.5, stream=None):
        self.label, self.total, self.unit, self.interval = label, total, unit, interval
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.start = self.last_print = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last_print >= self.interval or self.done >= self.total:
            self.last_print = now
            self._print(now)

    def _print(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        end = "\n" if self.done >= self.total else ""
        self.stream.write(
            f"\r{self.label}  {self.done}/{self.total} {self.unit}  {rate:.1f} {self.unit}/s  "
            f"ETA {format_duration(eta)}  elapsed {format_duration(elapsed)}   {end}"
        )
        self.stream.flush()
