"""Soak: a long 2-rank run under a seeded schedule of real faults ends with the weights of the
uninterrupted run.

    make soak        # or: python -m pytest -q -s -m slow tests/test_soak.py
    SOAK_SEED=7 SOAK_EPOCHS=50 make soak

The faults, at seeded steps: `kill -9` of a random rank's worker (torchrun restarts the
group, which continues from the newest complete set), a file-size limit on a random rank
(its next checkpoint write fails with EFBIG: every rank stops with the same line, torchrun
restarts them, they continue from the set before), and one SIGTERM to torchrun (pre-emption:
every rank checkpoints and exits; the job is started again with --resume=True). Kills can
land anywhere, also in the middle of a checkpoint write.
"""
import os
import random
import re
import resource
import signal
from dataclasses import dataclass

import pytest
import torch

from conftest import copy_ms1m_style
from helpers import PYTHON, REPO_ROOT, Launched, workers_of

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("SOAK_SEED", "13"))
EPOCHS = int(os.environ.get("SOAK_EPOCHS", "40"))  # 6 steps each
KILLS = int(os.environ.get("SOAK_KILLS", "6"))
COMMON = [
    "--device=cpu", "--network=mbf", "--num_classes=12", "--num_image=48", "--batch_size=4", "--frequent=1",
    "--num_workers=1", "--embedding_size=128", "--lr=0.05", "--warmup_epoch=1", "--precision=fp32",
    "--val_targets=[]", f"--num_epoch={EPOCHS}", "--save_every_steps=5", "--keep_checkpoints=2",
]
LAUNCH_TIMEOUT = 60 * 60


@dataclass(frozen=True)
class Fault:
    step: int  # strike once a step >= this one is logged
    kind: str  # "kill", "file size" or "sigterm"
    rank: int


def _schedule(total_steps: int, rng: random.Random) -> list[Fault]:
    kinds = ["kill"] * KILLS + ["file size", "sigterm"]
    steps = sorted(rng.sample(range(7, total_steps - 3), len(kinds)))  # after the first set (step 5)
    rng.shuffle(kinds)
    return [Fault(step, kind, rng.randrange(2)) for step, kind in zip(steps, kinds)]


def _torchrun(rec, out, *extra):
    return Launched([
        PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=20",
        REPO_ROOT / "train.py", "configs/ms1mv3_r50", f"--rec={rec}", f"--output={out}", *COMMON, *extra,
    ])


def _wait_for_line(job: Launched, matches, start: int) -> int | None:
    """Index of the first line after line `start` for which `matches(line)` (None: the job ended first)."""
    t = job.transcript
    with t.changed:
        while True:
            for i in range(start, len(t.lines)):
                if matches(t.lines[i]):
                    return i
            start = len(t.lines)
            if t.running == 0:
                return None
            t.changed.wait(600)


def _step_at_least(step: int):
    def matches(line):
        m = re.search(r"step (\d+)/\d+ \(", line)
        return m is not None and int(m.group(1)) >= step

    return matches


def _strike(job: Launched, fault: Fault) -> None:
    workers = workers_of(job.proc.pid)
    if fault.kind == "sigterm":
        job.proc.send_signal(signal.SIGTERM)
    elif fault.kind == "kill":
        os.kill(workers[fault.rank], signal.SIGKILL)
    else:  # 1 MB: far below the rank's checkpoint file (megabytes), above its logs
        resource.prlimit(workers[fault.rank], resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def test_soak(tmp_path, capsys):
    rec = copy_ms1m_style(tmp_path / "rec")
    total_steps = 6 * EPOCHS
    reference = tmp_path / "reference"
    job = _torchrun(rec, reference)
    assert job.finish(LAUNCH_TIMEOUT) == 0, job.output[-4000:]

    faults = _schedule(total_steps, random.Random(SEED))
    out = tmp_path / "run"
    job, launches, line = _torchrun(rec, out), 1, 0
    outputs = []
    for fault in faults:
        line = _wait_for_line(job, _step_at_least(fault.step), line)
        assert line is not None, f"the job ended before {fault}:\n{job.output[-4000:]}"
        _strike(job, fault)
        if fault.kind == "sigterm":
            job.finish(LAUNCH_TIMEOUT)
            assert "stopped by SIGTERM at step" in job.output, job.output[-4000:]
            outputs.append(job.output)
            job, launches, line = _torchrun(rec, out, "--resume=True"), launches + 1, 0
            continue
        if fault.kind == "file size":  # the rank's next checkpoint write fails
            line = _wait_for_line(job, lambda text: "not written on rank" in text, line)
            assert line is not None, job.output[-4000:]
        # torchrun restarts the group, which continues from the newest complete set
        line = _wait_for_line(job, lambda text: "resumed from" in text, line)
        assert line is not None, f"no restart after {fault}:\n{job.output[-4000:]}"
    assert job.finish(LAUNCH_TIMEOUT) == 0, job.output[-6000:]
    outputs.append(job.output)

    log = (out / "training.log").read_text()
    # every rank stops with the same line: `error (rank R): checkpoint step_N not written on rank F: ...`
    stops = re.findall(r"^error \(rank (\d)\): (checkpoint step_\d+ not written on rank \d: \[Errno 27\] File too large: .*)$",
                       "".join(outputs), re.MULTILINE)
    write_failures = len({message for _, message in stops})
    final = torch.load(out / "model.pt", weights_only=True)
    want = torch.load(reference / "model.pt", weights_only=True)
    worst = max(float((final[k].double() - want[k].double()).abs().max()) for k in want if want[k].numel())
    with capsys.disabled():
        print(
            f"\nsoak (seed {SEED}): {total_steps} steps, {len(faults)} faults survived "
            f"({sum(f.kind == 'kill' for f in faults)} kill -9, 1 file-size limit, 1 SIGTERM + resume), "
            f"{log.count('resumed from')} resumes in {launches} launches, {write_failures} write failure logged; "
            f"max |final - uninterrupted| = {worst:g}"
        )
    assert log.count(f"step {total_steps}/{total_steps} (100.0%)") == 1
    assert write_failures == 1 and sorted(rank for rank, _ in stops) == ["0", "1"], stops
    assert worst <= 1e-6, f"final weights differ from the uninterrupted run's by {worst}"
