"""utils.atomic_file, the one atomic-write helper: readers see the old file or the whole new
one; a failure (a real one: a full file-size limit, an exception in the writer) leaves the
old content and no temporary file; new files get the usual permissions."""
from __future__ import annotations

import os
import stat
import textwrap

import pytest

from helpers import PYTHON, run_script
from utils.atomic_file import atomic_path, atomic_write


def test_success_replaces_the_file_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "config.json"
    target.write_text("old")
    with atomic_write(target, "w") as f:
        f.write("new")
        assert target.read_text() == "old"  # not visible before the block ends
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["config.json"]


def test_an_exception_keeps_the_old_content_and_removes_the_temporary_file(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="exporter crashed"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half a graph")
            raise RuntimeError("exporter crashed")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["model.onnx"]


def test_new_files_get_the_permissions_of_the_umask_not_0600(tmp_path):
    old_mask = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "model.pt") as f:
            f.write(b"x")
    finally:
        os.umask(old_mask)
    assert stat.S_IMODE((tmp_path / "model.pt").stat().st_mode) == 0o644  # readable by the team


@pytest.mark.parametrize("durable", [False, True])
def test_a_file_size_limit_hit_while_writing_keeps_the_old_file(tmp_path, durable):
    """A real fault: the process may write at most 64 KiB per file (RLIMIT_FSIZE), as a full
    quota would stop it; the write fails with EFBIG, the old file stays whole."""
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"complete old checkpoint")
    script = textwrap.dedent(f"""
        import errno, resource, signal
        from utils.atomic_file import atomic_write
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
        try:
            with atomic_write({str(target)!r}, durable={durable}) as f:
                for _ in range(64):
                    f.write(b"x" * 4096)
        except OSError as e:
            print("failed", errno.errorcode[e.errno])
    """)
    proc = run_script([PYTHON, "-c", script])
    assert proc.stdout.strip() == "failed EFBIG"
    assert target.read_bytes() == b"complete old checkpoint" and os.listdir(tmp_path) == ["checkpoint.pt"]


def test_only_whole_file_modes():
    with pytest.raises(ValueError, match="mode 'wb' or 'w'"):
        with atomic_write("unused", "a"):
            pass
