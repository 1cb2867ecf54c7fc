"""Faults end to end, with real faults: killed workers of a two-node torchrun job, a file-size
limit and a full tmpfs while a checkpoint is written, corrupt and mixed-up rank files, and
restarts whose nodes disagree on TORCHELASTIC_RESTART_COUNT.

Every run trains the same 6 steps (2 ranks x batch 4 of 48 images, fp32, checkpoint sets
every 2 steps); a run that was interrupted and continued must end with the weights of the
uninterrupted `reference` run.
"""
import json
import os
import re
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import copy_ms1m_style
from helpers import PYTHON, REPO_ROOT, Launched, Transcript, free_port, workers_of
from utils import checkpoint as ckpt
from utils import run_identity
from utils.distributed import DistContext

NUM_CLASSES, NUM_IMAGES, DIM = 12, 48, 128
# No data-loader worker processes (each would import torch again): a killed rank with its
# loader worker is test_resilience's test_killed_worker_is_restarted_and_the_run_finishes.
COMMON = [
    "--device=cpu", "--network=mbf", f"--num_classes={NUM_CLASSES}", f"--num_image={NUM_IMAGES}", "--batch_size=4",
    "--frequent=1", "--num_workers=0", f"--embedding_size={DIM}", "--lr=0.05", "--warmup_epoch=0", "--precision=fp32",
    "--val_targets=[]", "--num_epoch=1", "--save_every_steps=2", "--keep_checkpoints=3",
]
TORCHRUN = [PYTHON, "-m", "torch.distributed.run"]
STANDALONE = [*TORCHRUN, "--standalone", "--nproc_per_node=2"]
DEADLINE = 240  # seconds for one launch: a hang fails the test instead of blocking the suite


@pytest.fixture(scope="module")
def rec(tmp_path_factory):
    return copy_ms1m_style(tmp_path_factory.mktemp("rec"))


def _args(rec, output, *extra):
    return [REPO_ROOT / "train.py", "configs/ms1mv3_r50", f"--rec={rec}", f"--output={output}", *COMMON, *extra]


def _run(launcher, rec, output, *extra, env=None):
    job = Launched([*launcher, *_args(rec, output, *extra)], env=env)
    code = job.finish(DEADLINE)
    return code, job.output


def _sets(output):
    complete, incomplete = ckpt.list_sets(output)
    return [s.step for s in complete], [p.name for p in incomplete]


def _assert_same_weights(output, reference):
    got = torch.load(Path(output) / "model.pt", map_location="cpu", weights_only=True)
    want = torch.load(Path(reference) / "model.pt", map_location="cpu", weights_only=True)
    assert got.keys() == want.keys()
    worst = max(float((got[k].double() - want[k].double()).abs().max()) for k in want if want[k].numel())
    assert worst <= 1e-6, f"final weights differ from the uninterrupted run's by {worst}"


# A worker's `error (rank R): message` line. The workers share one stderr, so another process's
# log line can follow a message on the same line before its newline: a timestamp ends it too.
_ERROR_LINE = re.compile(r"error \(rank \d+\): (.+?)(?=\d{4}-\d\d-\d\d \d\d:\d\d:\d\d|\n|$)")


def _error_lines(text):
    """The `error (rank R): ...` messages of the workers, without the rank prefix."""
    return sorted({m.strip() for m in _ERROR_LINE.findall(text)})


@pytest.fixture(scope="module")
def reference(rec, tmp_path_factory):
    """The uninterrupted 2-rank run: sets at steps 2, 4 and 6, and its final model.pt."""
    out = tmp_path_factory.mktemp("reference") / "run"
    code, output = _run(STANDALONE, rec, out)
    assert code == 0, output[-4000:]
    assert _sets(out) == ([6, 4, 2], [])
    return out


# ---- the store namespace and the resume decision: ranks and nodes that disagree on their counters

_JOIN = """
import json, sys
sys.path.insert(0, sys.argv[1])
import torch, torch.distributed as dist
from utils.distributed import cleanup_distributed, init_distributed
ctx = init_distributed(timeout_minutes=0.5, device="cpu")
total = torch.tensor([ctx.rank + 1.0])
dist.all_reduce(total)
print(json.dumps({"rank": ctx.rank, "sum": float(total), "job": ctx.job_id}))
cleanup_distributed()
"""


def _attempt(port, restart_counts):
    """One attempt of a 2-rank job whose agents' store is at `port`; the workers' reports."""
    procs = []
    for rank, count in enumerate(restart_counts):
        env = dict(
            os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0",
            LOCAL_WORLD_SIZE="1", TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RESTART_COUNT=str(count),
            TORCHELASTIC_RUN_ID="faults", OMP_NUM_THREADS="1",
        )
        procs.append(subprocess.Popen([PYTHON, "-c", _JOIN, str(REPO_ROOT)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


def _agent_store():
    """A store as torchrun's agents host it for a job (here, in the test process)."""
    import datetime

    import torch.distributed as dist

    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=60))


def test_ranks_agree_on_the_attempt_whatever_their_restart_counts():
    """The agents' store outlives the attempts and keeps their keys. After a failure on node 1
    only node 1's counter advances (0 vs 1): the ranks must still meet, in a namespace that
    none of the failed attempt's keys are in, and keep the job's id."""
    store = _agent_store()
    first = _attempt(store.port, (0, 0))
    second = _attempt(store.port, (0, 1))  # node 0 was restarted for node 1's failure
    assert [r["sum"] for r in first + second] == [3.0] * 4
    jobs = {r["job"] for r in first + second}
    assert len(jobs) == 1 and None not in jobs  # one job, however often restarted


def test_the_job_id_lasts_as_long_as_the_agents_store(monkeypatch):
    from utils.distributed import init_distributed

    def job_of(store):
        monkeypatch.setenv("MASTER_PORT", str(store.port))
        return init_distributed(device="cpu").job_id

    for key, value in dict(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", TORCHELASTIC_USE_AGENT_STORE="True").items():
        monkeypatch.setenv(key, value)
    store = _agent_store()
    first = job_of(store)
    assert first and job_of(store) == first  # a restart of the job
    assert job_of(_agent_store()) != first  # another job
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    assert job_of(store) is None


def test_run_identity_tells_this_run_from_another(tmp_path, monkeypatch):
    ctx = DistContext()
    cfg = {"network": "mbf", "lr": 0.1, "resume": False}
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    this = run_identity.of_this_launch(cfg, DistContext(job_id="1234"))
    assert not run_identity.continues_this_run(tmp_path, this, ctx)  # nothing recorded yet
    run_identity.record(tmp_path, this)
    assert run_identity.continues_this_run(tmp_path, this, ctx)
    assert run_identity.continues_this_run(tmp_path, run_identity.of_this_launch(dict(cfg, resume=True), DistContext(job_id="1234")), ctx)
    assert not run_identity.continues_this_run(tmp_path, run_identity.of_this_launch(cfg, DistContext(job_id="5678")), ctx)
    assert not run_identity.continues_this_run(tmp_path, run_identity.of_this_launch(dict(cfg, lr=0.2), DistContext(job_id="1234")), ctx)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")  # not under torchelastic: only --resume=True continues
    assert not run_identity.continues_this_run(tmp_path, run_identity.of_this_launch(cfg, DistContext(job_id="1234")), ctx)


def test_a_restart_with_restart_count_0_continues_and_a_new_job_is_refused(rec, tmp_path):
    """One worker under an emulated torchelastic agent (its store hosted here). The restarted
    worker sees TORCHELASTIC_RESTART_COUNT=0, as on a node restarted for another node's failure
    (a finished run here: the restart has nothing left to train, but must resume, not refuse)."""
    def agent_env(store):
        return dict(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
            LOCAL_WORLD_SIZE="1", TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RESTART_COUNT="0",
            TORCHELASTIC_RUN_ID="faults",
        )

    store = _agent_store()
    out = tmp_path / "run"
    code, output = _run([PYTHON], rec, out, "--max_steps=2", env=agent_env(store))
    assert code == 0 and _sets(out)[0] == [2], output[-3000:]

    code, output = _run([PYTHON], rec, out, "--max_steps=2", env=agent_env(store))  # the restart
    assert code == 0, output[-3000:]
    assert "resumed from" in output and "global step 2" in output

    new_job = _agent_store()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    code, output = _run([PYTHON], rec, out, "--max_steps=2", env=agent_env(new_job))
    assert code == 2 and "already holds checkpoints of a run; pass --resume=True" in output.strip().splitlines()[-1]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


# ---- two torchrun agents: a killed worker on each node

def test_two_nodes_continue_after_a_killed_worker_on_each(rec, reference, tmp_path):
    """Node 1's worker is killed after the first set; then, after the restart, node 0's. Each
    restart continues the run on both nodes, and the weights end as if nothing happened."""
    out = tmp_path / "run"
    port = free_port()
    log = Transcript()
    agents = [
        Launched(
            [*TORCHRUN, "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
             "--rdzv-id=faults", "--max-restarts=2", *_args(rec, out)],
            transcript=log,
        )
        for _ in range(2)
    ]
    try:
        for kill_rank, after_line in ((1, r"step 3/6"), (0, r"resumed from")):
            assert log.wait_for(after_line, timeout=DEADLINE), log.text()[-4000:]
            if kill_rank == 0:  # the restarted run reaches its next step
                assert log.wait_for(r"step \d/6", times=log.count(r"step \d/6") + 1, timeout=DEADLINE)
            workers = {rank: pid for agent in agents for rank, pid in workers_of(agent.proc.pid).items()}
            assert sorted(workers) == [0, 1], workers
            os.kill(workers[kill_rank], signal.SIGKILL)
        codes = [agent.finish(DEADLINE) for agent in agents]
    finally:
        for agent in agents:
            agent.finish(0.1)
    assert codes == [0, 0], log.text()[-6000:]
    text = (out / "training.log").read_text()
    assert text.count("resumed from") == 2 and "already holds checkpoints" not in log.text()
    assert text.count("step 6/6 (100.0%)") == 1
    _assert_same_weights(out, reference)


# ---- write failures

def test_a_file_size_limit_on_one_rank_stops_every_rank_then_the_run_resumes(rec, reference, tmp_path):
    """After the first set, rank 1 gets a file-size limit (as `prlimit` sets one): its next
    checkpoint file fails with EFBIG inside torch's zip writer."""
    out = tmp_path / "run"
    failing_rank = 1
    job = Launched([*STANDALONE, *_args(rec, out)])
    assert job.transcript.wait_for(r"step 3/6", timeout=DEADLINE), job.output[-3000:]
    pid = workers_of(job.proc.pid)[failing_rank]
    limit = 64 * 1024  # the rank's checkpoint file is megabytes
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    code = job.finish(DEADLINE)
    assert code != 0
    lines = _error_lines(job.output)
    assert len(lines) == 1 and job.output.count("error (rank ") == 2, job.output[-4000:]  # both ranks, one line
    failed_step = int(lines[0].split()[1].removeprefix("step_"))
    assert lines[0] == (
        f"checkpoint step_{failed_step:09d} not written on rank {failing_rank}: [Errno 27] File too large: "
        f"{out / 'checkpoints' / f'step_{failed_step:09d}' / f'checkpoint_gpu_{failing_rank}.pt'}"
    )
    # the previous complete set is intact, the failed one is gone, model.pt is the previous set's
    assert _sets(out) == (list(range(failed_step - 2, 0, -2)), [])
    saved = torch.load(out / "checkpoints" / f"step_{failed_step - 2:09d}" / "checkpoint_gpu_0.pt", weights_only=True)
    model = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.equal(model[k], v) for k, v in saved["state_dict_backbone"].items())

    code, output = _run(STANDALONE, rec, out, "--resume=True")
    assert code == 0, output[-4000:]
    _assert_same_weights(out, reference)


@pytest.fixture
def tiny_tmpfs(tmp_path, reference):
    """A tmpfs that holds the first checkpoint set, model.pt and the logs, and half a set more."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    step = reference / "checkpoints" / "step_000000002"
    set_bytes = sum(p.stat().st_size for p in step.iterdir())
    size = set_bytes + (reference / "model.pt").stat().st_size + set_bytes // 2 + (2 << 20)
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_stops_every_rank_and_keeps_the_previous_set(rec, tiny_tmpfs):
    out = tiny_tmpfs / "run"
    code, output = _run(STANDALONE, rec, out)
    assert code != 0
    lines = _error_lines(output)
    assert len(lines) == 1 and output.count("error (rank ") == 2, output[-4000:]
    assert lines[0].startswith("checkpoint step_000000004 not written on rank ") and "[Errno 28] No space left on device" in lines[0]
    assert _sets(out) == ([2], [])
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary left
    for rank in (0, 1):  # the previous set reads back
        ckpt.load_rank_file(out / "checkpoints" / "step_000000002" / f"checkpoint_gpu_{rank}.pt")


# ---- reading: a corrupt file of one rank, a file of another step

def test_both_ranks_fall_back_together_past_a_corrupt_and_a_mixed_set(rec, reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "model.pt").unlink()
    sets = out / "checkpoints"
    truncated = sets / "step_000000006" / "checkpoint_gpu_1.pt"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    # rank 1's part of step 4 is its step-2 file, as a stale view of a shared file system shows it
    shutil.copyfile(sets / "step_000000002" / "checkpoint_gpu_1.pt", sets / "step_000000004" / "checkpoint_gpu_1.pt")

    code, output = _run(STANDALONE, rec, out, "--resume=True")
    assert code == 0, output[-4000:]
    text = (out / "training.log").read_text()
    assert "cannot resume from" in text and "step_000000006/checkpoint_gpu_1.pt is corrupt" in text
    assert "step_000000004 are of different steps (2 to 4)" in text
    assert "resumed from" in text and "step_000000002: epoch 0, batch 2, global step 2" in text
    _assert_same_weights(out, reference)


def test_a_rank_file_that_reads_but_does_not_load_sends_both_ranks_to_the_older_set(rec, reference, tmp_path):
    """Rank 1's newest file is a valid torch file whose optimizer state lacks its parameter
    groups (as a writer of another version might leave it): reading and re-sharding succeed,
    only loading it into the run fails, on rank 1 alone."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "model.pt").unlink()
    path = out / "checkpoints" / "step_000000006" / "checkpoint_gpu_1.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    del state["state_optimizer"]["param_groups"]
    torch.save(state, path)

    code, output = _run(STANDALONE, rec, out, "--resume=True")
    assert code == 0, output[-4000:]
    text = (out / "training.log").read_text()
    assert "step_000000006 cannot be used on rank 1: KeyError: 'param_groups'" in text
    assert "resumed from" in text and "step_000000004: epoch 0, batch 4, global step 4" in text
    _assert_same_weights(out, reference)


def test_a_checkpoint_one_rank_refuses_stops_both_ranks_with_the_same_line(rec, reference, tmp_path):
    """Only rank 1's file says another network (as a mixed-up copy would): the run's settings
    do not fit it, which is no reason to fall back; every rank stops with one message."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for step in (2, 4, 6):
        path = out / "checkpoints" / f"step_{step:09d}" / "checkpoint_gpu_1.pt"
        state = torch.load(path, map_location="cpu", weights_only=True)
        state["run"]["network"] = "r18"
        torch.save(state, path)
    before = {p: p.read_bytes() for p in (out / "checkpoints").rglob("*.pt")}

    code, output = _run(STANDALONE, rec, out, "--resume=True")
    assert code != 0
    lines = _error_lines(output)
    assert len(lines) == 1 and "network='r18'" in lines[0], output[-4000:]
    assert output.count("error (rank ") == 2, output[-4000:]
    assert {p: p.read_bytes() for p in (out / "checkpoints").rglob("*.pt")} == before


# ---- the training step's guard before a save

def test_a_skipped_last_step_still_leaves_a_checkpoint_that_continues_the_run(rec, tmp_path):
    """lr=1e30: step 1 blows the weights up, steps 2 and 3 are skipped as non-finite. The end
    of the run must still save the last good state (step 1's weights, unchanged since)."""
    out = tmp_path / "run"
    code, output = _run(
        [PYTHON], rec, out, "--lr=1e30", "--batch_size=8", "--max_steps=3", "--save_every_steps=0", "--max_nonfinite_steps=0"
    )
    assert code == 0, output[-3000:]
    assert _sets(out) == ([3], [])
    saved = torch.load(out / "checkpoints" / "step_000000003" / "checkpoint_gpu_0.pt", weights_only=True)
    model = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.equal(model[k], v) for k, v in saved["state_dict_backbone"].items())
