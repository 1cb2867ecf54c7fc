"""Fault tolerance end to end: a killed worker under torchrun's restarts, resuming on another
world size (2 -> 1 after a corrupt newest set, 1 -> 3 across two torchrun agents), the
PartialFC merge/split tool, fine-tuning from pretrained weights, non-finite losses, and
checkpoints that do not fit.

"The loss continues where it was" is checked exactly: the loss that the resumed (or
fine-tuned) run logs for its first step must equal the loss that the test computes
itself from the saved weights on the samples that step should see. Any wrong class
range, backbone, optimizer position or data position shows up as a different number.
The runs use precision fp32, so the test's own forward pass matches the run's.
"""
import os
import re
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import pytest
import torch

from conftest import copy_ms1m_style
from helpers import PYTHON, REPO_ROOT, free_port, run_script

NUM_CLASSES, NUM_IMAGES, DIM = 12, 48, 128
# No data-loader worker processes (each would import torch again), except where a killed rank
# leaves one behind (test_killed_worker_is_restarted_and_the_run_finishes).
COMMON = [
    "--device=cpu", "--network=mbf", f"--num_classes={NUM_CLASSES}", f"--num_image={NUM_IMAGES}", "--batch_size=4", "--frequent=1",
    "--num_workers=0", f"--embedding_size={DIM}", "--lr=0.05", "--warmup_epoch=0", "--precision=fp32",
    "--val_targets=[]", "--num_epoch=1",
]
TORCHRUN = [PYTHON, "-m", "torch.distributed.run"]


@pytest.fixture(scope="module")
def rec(tmp_path_factory):
    return copy_ms1m_style(tmp_path_factory.mktemp("rec"))


def _args(rec, output, *extra):
    return [REPO_ROOT / "train.py", "configs/ms1mv3_r50", f"--rec={rec}", f"--output={output}", *COMMON, *extra]


def _train(launcher, rec, output, *extra, check=True):
    return run_script([*launcher, *_args(rec, output, *extra)], check=check, timeout=300)


def _logged_loss(output, step):
    """The loss logged for `step` (the last time it was logged)."""
    found = re.findall(rf"step {step}/\d+ \([^)]*\) \| epoch \d+ \| loss ([0-9.]+)", (Path(output) / "training.log").read_text())
    assert found, f"no progress line for step {step} in {output}/training.log"
    return float(found[-1])


def _expected_loss(rec, backbone_state, centres, epoch, start_batch, world_size):
    """The loss of the first step of a run on `world_size` ranks from (epoch, start_batch).

    Each rank's batch goes through the backbone in training mode (BatchNorm statistics
    per rank, as under DDP); one margin softmax over all classes, as PartialFC computes.
    """
    from backbones import get_model
    from dataset import get_dataloader
    from losses import CombinedMarginLoss, PartialFC
    from utils.config import load_config

    cfg = load_config("configs/ms1mv3_r50")
    backbone = get_model("mbf", num_features=DIM)
    backbone.load_state_dict(backbone_state, strict=True)
    backbone.train()
    embeddings, labels = [], []
    with torch.no_grad():
        for rank in range(world_size):
            loader = get_dataloader(
                rec, 0, 4, seed=cfg.seed, num_workers=0, rank=rank, world_size=world_size, device="cpu",
                num_classes=NUM_CLASSES,
            )
            loader.set_epoch(epoch, start_batch)
            images, y = next(iter(loader))
            embeddings.append(backbone(images))
            labels.append(y)
        head = PartialFC(CombinedMarginLoss(cfg.margin_scale, *cfg.margin_list), DIM, NUM_CLASSES, rank=0, world_size=1)
        head.weight.copy_(centres)
        return float(head(torch.cat(embeddings), torch.cat(labels)))


class _Deadline:
    """Stops launched torchrun agents (SIGTERM, which they pass on to their workers) when the
    test leaves the block or after `seconds`: a hang fails the test instead of blocking it."""

    def __init__(self, procs, seconds=240):
        self.procs, self.timer = procs, threading.Timer(seconds, self.stop)

    def stop(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()

    def __enter__(self):
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()
        self.stop()
        for proc in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def _set_names(output):
    return sorted(p.name for p in (Path(output) / "checkpoints").iterdir())


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def two_rank_run(rec, tmp_path_factory):
    """2 gloo ranks, 3 of the 6 steps of an epoch: checkpoint sets at steps 2 and 3."""
    out = tmp_path_factory.mktemp("two") / "run"
    _train([*TORCHRUN, "--standalone", "--nproc_per_node=2"], rec, out, "--max_steps=3", "--save_every_steps=2")
    assert _set_names(out) == ["step_000000002", "step_000000003"]
    return out


def test_resume_on_one_rank_after_a_corrupt_newest_set(rec, two_rank_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_rank_run, out)
    corrupt = out / "checkpoints" / "step_000000003" / "checkpoint_gpu_1.pt"
    corrupt.write_bytes(corrupt.read_bytes()[:1000])  # truncated, as by a crash without atomic rename

    _train([PYTHON], rec, out, "--resume=True", "--save_every_steps=0", "--max_steps=7")
    log = (out / "training.log").read_text()
    assert "cannot resume from" in log and "step_000000003" in log and "corrupt" in log
    assert "resumed from" in log and "step_000000002: epoch 0, batch 2, global step 2" in log
    # 2 batches of 2 x 4 = 16 samples seen -> batch 4 of 4 samples; the schedule (12 steps per
    # epoch at batch 4, capped at 7) is at its step 4
    assert "16 samples of epoch 0 were seen, continuing at batch 4 of epoch 0 (16 samples)" in log
    assert "step 2 continues at step 4 of the 7-step learning-rate schedule: the run ends at step 5 (3 remaining)" in log
    assert "step 5/5 (100.0%)" in log
    assert _set_names(out) == ["step_000000002", "step_000000003.unreadable", "step_000000005"]
    final = _load(out / "checkpoints" / "step_000000005" / "checkpoint_gpu_0.pt")
    assert final["world_size"] == 1 and final["state_dict_softmax_fc"]["weight"].shape == (NUM_CLASSES, DIM)
    assert (final["epoch"], final["batch_in_epoch"]) == (0, 7)

    saved = [_load(two_rank_run / "checkpoints" / "step_000000002" / f"checkpoint_gpu_{r}.pt") for r in (0, 1)]
    centres = torch.cat([s["state_dict_softmax_fc"]["weight"] for s in saved])
    expected = _expected_loss(rec, saved[0]["state_dict_backbone"], centres, epoch=0, start_batch=4, world_size=1)
    assert _logged_loss(out, 3) == pytest.approx(expected, rel=1e-4)


TOOL = REPO_ROOT / "tools" / "partial_fc_shards.py"


@pytest.fixture(scope="module")
def merged(two_rank_run, tmp_path_factory):
    """tools/partial_fc_shards.py merge of the two-rank run's newest set."""
    path = tmp_path_factory.mktemp("merged") / "merged.pt"
    proc = run_script([PYTHON, TOOL, "merge", two_rank_run, path])
    assert "merged 2 shards" in proc.stdout and f"({NUM_CLASSES}, {DIM})" in proc.stdout
    return path


def test_merge_and_split_tool(two_rank_run, merged, tmp_path):
    state = _load(merged)
    shards = [_load(two_rank_run / "checkpoints" / "step_000000003" / f"checkpoint_gpu_{r}.pt") for r in (0, 1)]
    assert torch.equal(state["state_dict_softmax_fc"]["weight"], torch.cat([s["state_dict_softmax_fc"]["weight"] for s in shards]))
    assert state["world_size"] == 1 and state["global_step"] == 3

    run_script([PYTHON, TOOL, "split", merged, tmp_path / "three", "--world-size=3"])
    (set_dir,) = (tmp_path / "three" / "checkpoints").iterdir()
    assert set_dir.name == "step_000000003" and (set_dir / "manifest.json").exists()
    parts = [_load(set_dir / f"checkpoint_gpu_{r}.pt") for r in range(3)]
    assert [p["partial_fc"]["class_start"] for p in parts] == [0, 4, 8]
    assert torch.equal(torch.cat([p["state_dict_softmax_fc"]["weight"] for p in parts]), state["state_dict_softmax_fc"]["weight"])

    one_shard = two_rank_run / "checkpoints" / "step_000000003" / "checkpoint_gpu_1.pt"
    refused = run_script([PYTHON, TOOL, "split", one_shard, tmp_path / "x", "--world-size=2"], check=False)
    assert refused.returncode == 2 and "merge the set first" in refused.stderr


@pytest.fixture(scope="module")
def fine_tuned(rec, two_rank_run, merged, tmp_path_factory):
    """A single-process run started from the two-rank run's weights (6 steps, then stopped by max_steps)."""
    folder = tmp_path_factory.mktemp("fine")
    backbone = _load(two_rank_run / "model.pt")
    torch.save({f"module.{k}": v for k, v in backbone.items()}, folder / "backbone.pth")  # as saved from DDP
    out = folder / "run"
    _train(
        [PYTHON], rec, out, f"--pretrained={folder / 'backbone.pth'}", f"--pretrained_fc={merged}",
        "--max_steps=6", "--save_every_steps=0",
    )
    return out


def test_fine_tuning_starts_from_the_pretrained_weights(rec, two_rank_run, merged, fine_tuned):
    out = fine_tuned
    log = (out / "training.log").read_text()
    assert "backbone initialised from" in log and "class centres initialised from" in log
    expected = _expected_loss(
        rec, _load(two_rank_run / "model.pt"), _load(merged)["state_dict_softmax_fc"]["weight"], epoch=0, start_batch=0,
        world_size=1,
    )
    assert _logged_loss(out, 1) == pytest.approx(expected, rel=1e-4)


def test_two_torchrun_agents_resume_a_one_rank_run_on_three_ranks(rec, fine_tuned, tmp_path):
    """Multi-node launch on this machine: --nnodes=2 with c10d rendezvous, 1 + 2 gloo workers."""
    source = fine_tuned
    out = tmp_path / "run"
    shutil.copytree(source, out)
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    agents = [
        subprocess.Popen(
            [*TORCHRUN, "--nnodes=2", f"--nproc_per_node={n}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
             "--rdzv-id=resilience", *map(str, _args(rec, out, "--resume=True", "--save_every_steps=0"))],
            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for n in (1, 2)
    ]
    with _Deadline(agents):
        outputs = [agent.communicate()[0] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], "\n".join(o[-3000:] for o in outputs)

    log = (out / "training.log").read_text()
    assert "world size 3 (gloo" in log
    # 6 batches of 4 = 24 samples -> 2 batches of 3 x 4; the epoch has 4 steps of 12 samples
    assert "24 samples of epoch 0 were seen, continuing at batch 2 of epoch 0 (24 samples)" in log
    assert "step 6 continues at step 2 of the 4-step learning-rate schedule: the run ends at step 8 (2 remaining)" in log
    assert "step 8/8 (100.0%)" in log
    assert _set_names(out) == ["step_000000006", "step_000000008"]
    parts = [_load(out / "checkpoints" / "step_000000008" / f"checkpoint_gpu_{r}.pt") for r in range(3)]
    assert [p["partial_fc"]["num_local"] for p in parts] == [4, 4, 4] and [p["world_size"] for p in parts] == [3] * 3

    saved = _load(source / "checkpoints" / "step_000000006" / "checkpoint_gpu_0.pt")
    expected = _expected_loss(
        rec, saved["state_dict_backbone"], saved["state_dict_softmax_fc"]["weight"], epoch=0, start_batch=2, world_size=3
    )
    assert _logged_loss(out, 7) == pytest.approx(expected, rel=1e-4)


def _workers_of(agent_pid):
    """Process ids whose parent is `agent_pid` and that run train.py (torchrun's workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == agent_pid and b"train.py" in cmdline:
            found.append(int(entry.name))
    return found


def test_killed_worker_is_restarted_and_the_run_finishes(rec, tmp_path):
    out = tmp_path / "run"
    # One loader worker per rank: the killed rank's worker is orphaned and must not hold the restart up.
    args = [*TORCHRUN, "--standalone", "--nproc_per_node=2", "--max-restarts=1",
            *_args(rec, out, "--save_every_steps=2", "--num_workers=1")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(list(map(str, args)), cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    with _Deadline([proc]):
        for line in proc.stdout:  # after the step-2 checkpoint, kill one worker outright
            lines.append(line)
            if "step 3/6" in line:
                workers = _workers_of(proc.pid)
                assert len(workers) == 2, workers
                os.kill(workers[-1], signal.SIGKILL)
                break
        lines.extend(proc.stdout)
        proc.wait()
    output = "".join(lines)
    assert proc.returncode == 0, output[-4000:]

    log = (out / "training.log").read_text()
    resumed = re.findall(r"resumed from .*step_(\d+): epoch 0, batch \d+, global step (\d+)", log)
    assert len(resumed) == 1, log[-3000:]  # the restart continued the run by itself
    assert resumed[0][0].lstrip("0") == resumed[0][1] and int(resumed[0][1]) in (2, 4)
    assert log.count("step 6/6 (100.0%)") == 1
    assert _set_names(out)[-1] == "step_000000006"
    for rank in (0, 1):
        state = _load(out / "checkpoints" / "step_000000006" / f"checkpoint_gpu_{rank}.pt")
        assert state["global_step"] == 6 and (state["epoch"], state["batch_in_epoch"]) == (1, 0)
    assert (out / "model.pt").exists() and (out / "model.onnx").exists()


def test_non_finite_losses_never_update_the_weights_and_stop_the_run(rec, tmp_path):
    """lr=1e30: step 1 blows the weights up, every later forward pass gives a non-finite loss.
    The skipped steps still save (their weights are step 1's, which they did not change)."""
    out = tmp_path / "run"
    blow_up = ["--lr=1e30", "--batch_size=8", "--save_every_steps=1", "--keep_checkpoints=5"]
    _train([PYTHON], rec, out, *blow_up, "--max_steps=3", "--max_nonfinite_steps=0")  # 0: never stop
    log = (out / "training.log").read_text()
    assert "skipped non-finite steps 2" in log and log.count("the checkpoint holds the weights before it") == 2
    assert _set_names(out) == ["step_000000001", "step_000000002", "step_000000003"]
    step1 = _load(out / "checkpoints" / "step_000000001" / "checkpoint_gpu_0.pt")["state_dict_backbone"]
    final = _load(out / "model.pt")  # after two skipped steps
    for saved in (_load(out / "checkpoints" / f"step_00000000{n}" / "checkpoint_gpu_0.pt")["state_dict_backbone"] for n in (2, 3)):
        assert all(torch.equal(saved[k], step1[k]) for k in step1), "a skipped step's checkpoint holds other weights"
    assert all(torch.equal(final[k], step1[k]) for k in step1), "a skipped step changed weights or BatchNorm statistics"
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())

    proc = _train([PYTHON], rec, out, *blow_up, "--resume=True", "--max_nonfinite_steps=2", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: 2 consecutive steps up to step 5 had a non-finite loss or gradient (max_nonfinite_steps=2); stopping."
    )
    for cset in (out / "checkpoints").glob("step_*"):  # whatever was saved holds step 1's weights
        saved = _load(cset / "checkpoint_gpu_0.pt")["state_dict_backbone"]
        assert all(torch.equal(saved[k], step1[k]) for k in step1), cset


@pytest.mark.parametrize(
    "damage, extra, message",
    [
        (None, ["--embedding_size=64"], "has embedding_size=128, the config has 64"),
        ("all", [], "none of the checkpoints in"),
    ],
)
def test_checkpoints_that_do_not_fit_are_refused_before_anything_changes(rec, two_rank_run, tmp_path, damage, extra, message):
    out = tmp_path / "run"
    shutil.copytree(two_rank_run, out)
    if damage == "all":
        for path in (out / "checkpoints").rglob("checkpoint_gpu_0.pt"):
            path.write_bytes(b"not a checkpoint")
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*")}
    proc = _train([PYTHON], rec, out, "--resume=True", *extra, check=False)
    assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*")} == before
