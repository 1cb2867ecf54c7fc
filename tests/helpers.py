"""Shared helpers for the tests: the one way to run multi-process gloo cases.

`run_distributed(fn, world_size, *args)` starts `world_size` fresh processes
(spawn), sets torchrun's environment variables in each, builds the
`DistContext` with `utils.distributed.init_distributed()`, calls
`fn(ctx, *args)` and returns the list of return values ordered by rank.
An exception in any worker fails the calling test with that worker's traceback.
`fn` must be a module-level function (it is pickled by name).
"""
from __future__ import annotations

import contextlib
import os
import pickle
import queue as queue_module
import socket
import time
import subprocess
import sys
import traceback
from pathlib import Path

import torch.multiprocessing as mp

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue):
    import torch

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)  # 2 cores shared by all workers
    from utils.distributed import cleanup_distributed, init_distributed

    try:
        ctx = init_distributed(timeout_minutes=2, device="cpu")
        result = fn(ctx, *args)
        # Plain pickle: tensors travel by value, not as shared memory that dies with this process.
        queue.put((rank, True, pickle.dumps(result)))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
        raise
    finally:
        cleanup_distributed()


def run_distributed(fn, world_size: int, *args, timeout: float = 300):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(rank, world_size, port, fn, args, queue), daemon=True)
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    # Drain the queue before joining: a worker blocks in put() until its message is read.
    results, errors = {}, []
    deadline = time.monotonic() + timeout
    while len(results) + len(errors) < world_size:
        try:
            rank, ok, payload = queue.get(timeout=1.0)
        except queue_module.Empty:
            dead = [p.exitcode for p in procs if not p.is_alive() and p.exitcode != 0]
            if dead:
                errors.append(f"a worker died without reporting (exit codes {dead})")
                break
            if time.monotonic() > deadline:
                errors.append(f"a worker did not report within {timeout}s")
                break
            continue
        if ok:
            results[rank] = pickle.loads(payload)
        else:
            errors.append(f"rank {rank}:\n{payload}")
        if errors:  # the others may be stuck in a collective waiting for the failed rank
            break
    for p in procs:
        p.join(5 if errors else max(1.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
    if errors:
        raise AssertionError("distributed worker failed:\n" + "\n".join(errors))
    missing = [r for r in range(world_size) if r not in results]
    if missing:
        codes = [p.exitcode for p in procs]
        raise AssertionError(f"ranks {missing} returned nothing (exit codes {codes})")
    return [results[r] for r in range(world_size)]


def _script_env(env):
    full_env = dict(os.environ)
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env["PYTHONUNBUFFERED"] = "1"
    if env:
        full_env.update(env)
    return full_env


def _check(proc, args):
    if proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {' '.join(map(str, args))}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
        )


def run_script(args, *, cwd=REPO_ROOT, env=None, timeout=600, check=True):
    """Run a command (list) with the test interpreter's environment; return CompletedProcess."""
    proc = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=_script_env(env), capture_output=True, text=True, timeout=timeout
    )
    if check:
        _check(proc, args)
    return proc


def run_script_on_terminal(args, *, cwd=REPO_ROOT, env=None, timeout=600, check=True):
    """`run_script` with stderr on a pseudo-terminal, as when a user runs the command by hand:
    progress bars are drawn. `proc.stderr` is what the terminal received."""
    import fcntl
    import pty
    import struct
    import termios
    import threading

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new pty is 0 columns wide
    received = []

    def drain():  # concurrently, so a full terminal buffer never blocks the command
        while True:
            try:
                data = os.read(master, 1 << 16)
            except OSError:  # EIO: the command closed its end
                return
            if not data:
                return
            received.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        with subprocess.Popen(
            [str(a) for a in args], cwd=cwd, env=_script_env(env), stdout=subprocess.PIPE, stderr=slave, text=True
        ) as popen:
            os.close(slave)
            slave = None
            stdout, _ = popen.communicate(timeout=timeout)
        reader.join(timeout=10)
    finally:
        if slave is not None:
            os.close(slave)
        os.close(master)
    proc = subprocess.CompletedProcess(args, popen.returncode, stdout, b"".join(received).decode(errors="replace"))
    if check:
        _check(proc, args)
    return proc


PYTHON = sys.executable


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """A real file-size limit (RLIMIT_FSIZE) on this process while the block runs.

    Python ignores SIGXFSZ, so a write that would grow a file beyond `nbytes` fails with
    EFBIG ("File too large") as on a full quota; torch.save reports it as a RuntimeError
    of its zip writer. Only the soft limit is lowered, so it can be raised back.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def workers_of(agent_pid: int) -> dict[int, int]:
    """{global rank: pid} of the train.py workers that torchrun agent `agent_pid` started."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == agent_pid and b"train.py" in cmdline:
            rank = next((int(v[5:]) for v in environ if v.startswith(b"RANK=")), None)
            if rank is not None:
                found[rank] = int(entry.name)
    return found


class Transcript:
    """The output lines of one or more launched processes, read by reader threads, so that a
    test can wait for a line (with a deadline) while several processes run side by side."""

    def __init__(self):
        import threading

        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.running = 0

    def text(self) -> str:
        with self.changed:
            return "".join(self.lines)

    def count(self, pattern: str) -> int:
        import re

        with self.changed:
            return sum(1 for line in self.lines if re.search(pattern, line))

    def wait_for(self, pattern: str, *, times: int = 1, timeout: float = 240) -> bool:
        """True once `times` lines matched `pattern`; False when every process ended first or the deadline passed."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while self.count(pattern) < times:
                left = deadline - time.monotonic()
                if self.running == 0 or left <= 0:
                    return False
                self.changed.wait(left)
        return True


class Launched:
    """A process whose merged stdout/stderr goes line by line into `transcript` (its own by default)."""

    def __init__(self, args, *, env=None, cwd=REPO_ROOT, transcript: Transcript | None = None):
        import threading

        full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
        self.transcript = transcript or Transcript()
        self.lines: list[str] = []
        with self.transcript.changed:
            self.transcript.running += 1
        self.proc = subprocess.Popen(
            [str(a) for a in args], cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        t = self.transcript
        for line in self.proc.stdout:
            with t.changed:
                self.lines.append(line)
                t.lines.append(line)
                t.changed.notify_all()
        self.proc.wait()
        with t.changed:
            t.running -= 1
            t.changed.notify_all()

    @property
    def output(self) -> str:
        with self.transcript.changed:
            return "".join(self.lines)

    def finish(self, timeout: float = 240) -> int:
        """Wait for the exit (terminating the process, then killing it, if it runs past `timeout`)."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=10)
        return self.proc.returncode
