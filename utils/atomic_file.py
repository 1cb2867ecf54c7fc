"""Writing a file so that readers see the old content or the complete new one, never a part.

The one home of the pattern: write a temporary file beside the target, rename it over
the target when the writing succeeded, remove it when it failed. `atomic_path` hands
out the temporary name (for writers that open files themselves: torch.onnx.export,
the RecordIO writer); `atomic_write` opens it. With `durable=True` the data are also
on disk before the rename and the rename is on disk afterwards (file fsync, rename,
directory fsync): what checkpoints need to survive a power cut, not just a crash.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import IO, Iterator


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable. Best effort: some file systems cannot fsync a folder."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, durable: bool = False) -> Iterator[Path]:
    """A fresh temporary path in the target's folder; when the block succeeds it replaces
    `path`, when it raises (or writes nothing) it is removed and `path` is untouched."""
    path = Path(path)
    # A hidden name unique to this process and call; created exclusively so that two writers
    # never share it, and with open() rather than mkstemp so it gets the usual permissions
    # (mkstemp's 0600 would make a shared model.pt unreadable to the rest of a team).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "xb"):
        pass
    try:
        yield tmp
        if durable:
            _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *, durable: bool = False, **open_kwargs) -> Iterator[IO]:
    """A file opened with `mode` ("wb" or "w"); when the block succeeds it replaces `path`."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write writes a whole file: mode 'wb' or 'w', got {mode!r}")
    with atomic_path(path, durable=durable) as tmp, open(tmp, mode, **open_kwargs) as f:
        yield f
