"""The SLURM launch (tools/slurm/): train.sbatch run as SLURM would run it, with SLURM's
variables set by hand and `srun` replaced by a stand-in that starts the command once per
"node" on this machine, so two nodes meet in a c10d rendezvous on loopback and train a tiny
run to the end; the time-limit signal stops the run at a checkpoint and requeues the job,
and the requeued job continues it. The node list's first host is checked on its own.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import PYTHON, REPO_ROOT, free_port, run_script

SBATCH = REPO_ROOT / "tools" / "slurm" / "train.sbatch"
NODE_LAUNCH = REPO_ROOT / "tools" / "slurm" / "node_launch.sh"

# srun --nodes=N --ntasks-per-node=1 ... CMD: CMD once per node with that node's SLURM ids,
# SIGTERM passed on to every task (as srun passes signals on to its tasks).
FAKE_SRUN = r"""#!/usr/bin/env bash
while [[ $1 == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 SLURM_STEP_ID=0 "$@" &
    pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
rc=0
for pid in "${pids[@]}"; do
    while :; do
        wait "$pid"; status=$?
        kill -0 "$pid" 2>/dev/null || break
    done
    ((status > rc)) && rc=$status
done
exit $rc
"""

# scontrol: `show hostnames LIST` for the loopback "nodes"; any other call is recorded.
FAKE_SCONTROL = r"""#!/usr/bin/env bash
if [[ $1 == show && $2 == hostnames ]]; then
    printf '127.0.0.1\n127.0.0.2\n'
    exit 0
fi
echo "$*" >> "$SCONTROL_CALLS"
"""

TINY_RUN = [
    "configs/ms1mv3_r50", "--rec=synthetic", "--network=mbf", "--num_classes=16", "--embedding_size=64",
    "--batch_size=4", "--device=cpu", "--precision=fp32", "--num_workers=0", "--frequent=1", "--val_targets=[]",
    "--save_every_steps=0", "--warmup_epoch=0",
]


def _bin(tmp_path, scontrol: bool) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    (folder / "srun").write_text(FAKE_SRUN)
    (folder / "srun").chmod(0o755)
    if scontrol:
        (folder / "scontrol").write_text(FAKE_SCONTROL)
        (folder / "scontrol").chmod(0o755)
    return folder


def _slurm_env(tmp_path, *, scontrol=False, restart_count=0) -> dict:
    return {
        "PATH": f"{_bin(tmp_path, scontrol)}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "127.0.0.[1-2]",  # two loopback "nodes"; the first hosts the rendezvous
        "SLURM_SUBMIT_DIR": str(REPO_ROOT),
        "SLURM_RESTART_COUNT": str(restart_count),
        "SCONTROL_CALLS": str(tmp_path / "scontrol_calls.txt"),
        "RDZV_PORT": str(free_port()),
        "NPROC_PER_NODE": "1",
        "MAX_RESTARTS": "0",
        "PYTHON": PYTHON,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }


@pytest.mark.parametrize("nodelist, first", [
    ("gpu01", "gpu01"),
    ("gpu[003-005,009],cpu1", "gpu003"),
    ("rack1-[07-09],login2", "rack1-07"),
    ("a[1-2]-b[3-4]", "a1-b3"),
    ("n1,n2", "n1"),
    ("127.0.0.[1-2]", "127.0.0.1"),
])
def test_first_host_of_a_slurm_node_list(nodelist, first):
    # PATH without scontrol: the script's own expansion
    command = ["bash", "-c", f'source "{NODE_LAUNCH}"; first_host "$1"', "_", nodelist]
    proc = run_script(command, env={"PATH": "/usr/bin:/bin"})
    assert proc.stdout.strip() == first


def test_first_host_comes_from_scontrol_when_it_is_there(tmp_path):
    env = {"PATH": f"{_bin(tmp_path, scontrol=True)}{os.pathsep}/usr/bin:/bin"}
    proc = run_script(["bash", "-c", f'source "{NODE_LAUNCH}"; first_host "$1"', "_", "weird-list"], env=env)
    assert proc.stdout.strip() == "127.0.0.1"


def test_launcher_outside_a_job_is_one_clear_error():
    env = {k: "" for k in ("SLURM_JOB_NODELIST", "SLURM_NNODES", "SLURM_JOB_ID")}
    proc = run_script(["bash", NODE_LAUNCH, "configs/ms1mv3_r50"], env=env, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: SLURM_JOB_NODELIST SLURM_NNODES SLURM_JOB_ID not set: start this script with srun inside a "
        "SLURM job (tools/slurm/train.sbatch)"
    )


def test_two_nodes_on_loopback_train_to_completion(tmp_path):
    out = tmp_path / "run"
    args = ["bash", SBATCH, *TINY_RUN, "--num_image=64", "--max_steps=3", f"--output={out}"]
    proc = run_script(args, env=_slurm_env(tmp_path), check=False, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "node 0: torchrun --nnodes=2 --nproc-per-node=1 rendezvous 127.0.0.1:" in output
    assert "node 1: torchrun --nnodes=2" in output
    log = (out / "training.log").read_text()
    assert "world size 2 (gloo" in log and "step 3/3 (100.0%)" in log
    assert (out / "model.pt").stat().st_size > 0 and (out / "model.onnx").exists()


def _wait_for(path: Path, text: str, proc: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the job ended before {text!r} appeared in {path}:\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"{text!r} did not appear in {path} within {seconds} s")


@pytest.mark.slow  # three two-node launches: about 3 minutes on 2 loaded cores
def test_time_limit_signal_checkpoints_requeues_and_the_requeued_job_continues(tmp_path):
    out = tmp_path / "run"
    args = ["bash", SBATCH, *TINY_RUN, "--num_image=320", "--max_steps=30", f"--output={out}"]
    env = dict(os.environ, **_slurm_env(tmp_path, scontrol=True))
    job = subprocess.Popen([str(a) for a in args], cwd=REPO_ROOT, env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_for(out / "training.log", "step 2/30", job)
        job.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@180` sends the batch script
        output = job.communicate(timeout=300)[0]
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode == 0, output[-4000:]
    assert "requeueing job 4242" in output
    assert (tmp_path / "scontrol_calls.txt").read_text().splitlines() == ["requeue 4242"]
    log = (out / "training.log").read_text()
    assert "stopped by SIGTERM at step" in log, log[-3000:]
    stopped_at = int(log.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert 2 <= stopped_at < 30
    assert (out / "checkpoints" / f"step_{stopped_at:09d}" / "manifest.json").exists()

    # SLURM starts the requeued job with SLURM_RESTART_COUNT=1 and the same command line
    requeued = run_script(args, env=_slurm_env(tmp_path, scontrol=True, restart_count=1), check=False, timeout=600)
    assert requeued.returncode == 0, (requeued.stdout + requeued.stderr)[-4000:]
    assert "--resume=True" in requeued.stdout
    log = (out / "training.log").read_text()
    assert f"global step {stopped_at}" in log and "step 30/30 (100.0%)" in log
    assert (out / "model.onnx").exists()
