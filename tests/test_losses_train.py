"""The margin losses through train.py: every loss (and sub-centres) trains end to end, the
checkpoint records the loss and its state, a stateful margin (AdaFace) resumed on another
world size carries its statistics, and a checkpoint of another loss or number of
sub-centres is refused in one line.

The per-loss runs call `train.main` in this process (the same entry point as
`python train.py`, without a Python and torch start-up per loss) on random tensors
(`rec=synthetic`), 2 steps each. The resume case runs torchrun with 2 gloo processes on
the mxnet-written MS1M-style pair from shared/testdata.
"""
import logging
import math
import re
from pathlib import Path

import pytest
import torch

from conftest import copy_ms1m_style
from helpers import PYTHON, REPO_ROOT, run_script
from losses import available_losses

NUM_CLASSES, NUM_IMAGES, DIM = 12, 48, 128
TINY = [
    "--device=cpu", "--network=mbf", f"--num_classes={NUM_CLASSES}", f"--num_image={NUM_IMAGES}", "--batch_size=4",
    "--frequent=1", "--num_workers=0", f"--embedding_size={DIM}", "--lr=0.05", "--warmup_epoch=0", "--precision=fp32",
    "--val_targets=[]", "--num_epoch=1", "--save_every_steps=0",
]
# The margin's state in the head's state_dict (docs/losses.md, "Checkpoints and resume").
MARGIN_STATE = {
    "adaface": {"margin_loss.batch_mean", "margin_loss.batch_std"},
    "curricularface": {"margin_loss.t"},
    "elasticface_arc": {"margin_loss._extra_state"},
    "elasticface_cos": {"margin_loss._extra_state"},
}


def _train_in_process(output, *extra) -> int:
    """train.main in this process, with one thread as the subprocesses (OMP_NUM_THREADS=1):
    on a loaded 2-core machine more threads than cores cost several times the time."""
    import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train.main(["configs/ms1mv3_r50", "--rec=synthetic", f"--output={output}", *TINY, *extra])
    finally:
        torch.set_num_threads(threads)
        for handler in logging.getLogger("arcface").handlers:
            handler.close()  # the training.log of this run


def _logged_losses(output) -> dict[int, float]:
    log = (Path(output) / "training.log").read_text()
    found = re.findall(r"step (\d+)/\d+ \([^)]*\) \| epoch \d+ \| loss ([-0-9.naif]+)", log)
    return {int(s): float(v) for s, v in found}


def _rank_state(output, step, rank=0):
    path = Path(output) / "checkpoints" / f"step_{step:09d}" / f"checkpoint_gpu_{rank}.pt"
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.parametrize("loss, subcenters", [(name, 1) for name in available_losses()] + [("arcface", 3)])
def test_every_loss_trains_through_train_py_and_its_checkpoint_records_it(tmp_path, loss, subcenters):
    out = tmp_path / "run"
    extra = [f"--loss={loss}", f"--num_subcenters={subcenters}", "--max_steps=2", "--batch_size=2"]
    assert _train_in_process(out, *extra) == 0
    losses = _logged_losses(out)
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) and v > 0 for v in losses.values()), losses
    state = _rank_state(out, 2)
    assert state["partial_fc"]["loss"] == loss and state["partial_fc"]["num_subcenters"] == subcenters
    head = state["state_dict_softmax_fc"]
    assert set(head) == {"weight"} | MARGIN_STATE.get(loss, set())
    assert tuple(head["weight"].shape) == (NUM_CLASSES * subcenters, DIM)
    assert (out / "model.onnx").stat().st_size > 0


@pytest.mark.parametrize("extra, message", [
    (["--loss=arcfase"], "loss 'arcfase' is unknown; valid losses: combined, arcface, cosface, adaface"),
    (["--loss=adaface", "--loss_params={'q': 1}"], "loss_params: 'q' is not a parameter of loss 'adaface'; valid: s, m, h"),
    (["--loss=adaface", "--loss_params={'h': -1}"], "h must be >= 0, got -1"),
    (["--num_subcenters=0"], "num_subcenters must be an integer in [1, 255], got 0"),
])
def test_bad_loss_input_is_one_error_line_and_writes_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "never"
    capsys.readouterr()
    assert _train_in_process(out, *extra) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not out.exists()


def test_a_checkpoint_of_another_loss_or_sub_centre_count_is_refused_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train_in_process(out, "--loss=adaface", "--max_steps=1", "--batch_size=2") == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    for extra, message in [
        (["--loss=curricularface"],
         "was trained with loss='adaface', the config has loss='curricularface': resume with --loss=adaface"),
        (["--loss=adaface", "--num_subcenters=3"], "has num_subcenters=1, the config has 3"),
    ]:
        assert _train_in_process(out, *extra, "--max_steps=2", "--batch_size=2", "--resume=True") == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: checkpoint ") and message in lines[0], lines
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


# ---- AdaFace's statistics carried across a change of world size ------------------------------

def _adaface_statistics_after_one_step(rec, state, start_batch, world_size, t_alpha):
    """batch_mean / batch_std after the first step of a run on `world_size` ranks of 4 from
    `state` (a checkpoint), computed here: each rank's batch through the saved backbone in
    training mode (BatchNorm per rank, as under DDP), the norms of the whole global batch,
    AdaFace's EMA from the saved statistics."""
    from backbones import get_model
    from dataset import get_dataloader
    from utils.config import load_config

    cfg = load_config("configs/ms1mv3_r50")
    backbone = get_model("mbf", num_features=DIM)
    backbone.load_state_dict(state["state_dict_backbone"], strict=True)
    backbone.train()
    norms = []
    with torch.no_grad():
        for rank in range(world_size):
            loader = get_dataloader(rec, 0, 4, seed=cfg.seed, num_workers=0, rank=rank, world_size=world_size,
                                    device="cpu", num_classes=NUM_CLASSES)
            loader.set_epoch(0, start_batch)
            images, _ = next(iter(loader))
            norms.append(backbone(images).norm(dim=1))
    norms = torch.cat(norms).clamp(0.001, 100.0)
    head = state["state_dict_softmax_fc"]
    mean = norms.mean() * t_alpha + (1 - t_alpha) * head["margin_loss.batch_mean"]
    std = norms.std() * t_alpha + (1 - t_alpha) * head["margin_loss.batch_std"]
    return float(mean), float(std)


def test_adaface_resumed_on_two_ranks_continues_the_statistics_of_one_process(tmp_path):
    rec = copy_ms1m_style(tmp_path / "rec")
    out = tmp_path / "run"
    adaface = ["--loss=adaface", "--loss_params={'t_alpha': 0.5}"]  # a large EMA weight: the state shows
    common = [REPO_ROOT / "train.py", "configs/ms1mv3_r50", f"--rec={rec}", f"--output={out}", *TINY, *adaface]
    # one process, global batch 8: 1 step (8 samples of the epoch)
    run_script([PYTHON, *common, "--batch_size=8", "--max_steps=1"], timeout=300)
    saved = _rank_state(out, 1)
    assert float(saved["state_dict_softmax_fc"]["margin_loss.batch_mean"]) != 20.0  # moved from its start

    # 2 ranks of 4 (the same global batch): the step after it, re-sharded from the 1-rank set
    torchrun = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run_script([*torchrun, *common, "--batch_size=4", "--max_steps=2", "--resume=True"], timeout=300)
    log = (out / "training.log").read_text()
    assert "resumed from" in log and "world size 2 (gloo" in log

    expected = _adaface_statistics_after_one_step(rec, saved, start_batch=1, world_size=2, t_alpha=0.5)
    for rank in (0, 1):
        head = _rank_state(out, 2, rank)["state_dict_softmax_fc"]
        actual = (float(head["margin_loss.batch_mean"]), float(head["margin_loss.batch_std"]))
        assert actual == pytest.approx(expected, rel=1e-4), (rank, actual, expected)


# ---- pretrained class centres with sub-centres ------------------------------------------------

def test_pretrained_class_centres_with_sub_centres_fill_each_ranks_rows(tmp_path, capsys):
    """`pretrained_fc` of a K = 3 run is [num_classes * 3, D], class-major (tools/partial_fc_shards.py
    merge writes it so): each rank takes the K rows of each of its classes."""
    from losses import get_margin, PartialFC
    from training.state import load_pretrained

    merged = torch.randn(NUM_CLASSES * 3, DIM)
    torch.save({"weight": merged}, tmp_path / "fc3.pt")
    shards = []
    for rank in (0, 1):
        head = PartialFC(get_margin("arcface"), DIM, NUM_CLASSES, num_subcenters=3, rank=rank, world_size=2)
        load_pretrained(torch.nn.Linear(1, 1), head, backbone_path=None, head_path=str(tmp_path / "fc3.pt"),
                        network="mbf")
        shards.append(head.weight.detach())
    assert torch.equal(torch.cat(shards), merged) and shards[1].shape == (NUM_CLASSES // 2 * 3, DIM)

    # through train.py: the merged centres of a K = 1 run do not fit a K = 3 run
    torch.save({"weight": merged[:NUM_CLASSES]}, tmp_path / "fc1.pt")
    capsys.readouterr()
    out = tmp_path / "never"
    assert _train_in_process(out, "--loss=arcface", "--num_subcenters=3", f"--pretrained_fc={tmp_path / 'fc1.pt'}",
                             "--max_steps=1", "--batch_size=2") == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0] == (
        f"error: {tmp_path / 'fc1.pt'} has class centres of shape ({NUM_CLASSES}, {DIM}), this run needs "
        f"({NUM_CLASSES * 3}, {DIM}) (num_classes={NUM_CLASSES} x num_subcenters=3)"
    ), lines
    assert not out.exists()
