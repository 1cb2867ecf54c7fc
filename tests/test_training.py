"""training/: the run state and its checkpoint schema, the resume arithmetic, the step (with
accumulation, DDP, auxiliary loss terms), the non-finite guard, the stop request and the
progress report -- without a subprocess (tests/test_train.py runs train.py end to end).

The models are tiny (3 x 8 x 8 images, a convolution, 8-dimensional embeddings) so that
every case runs in well under a second per step.
"""
import io
import logging
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import run_distributed
from losses import CombinedMarginLoss, PartialFC
from losses.optim import build_optimizer
from training.errors import TrainingInputError
from training.guard import NonFiniteGuard, StopRequest
from training.progress import ProgressReport, TrackerSink, margin_figures
from training.state import (
    Position, RunInfo, RunState, StepPlan, check_compatible, plan_run, resume_point, steps_after_resume,
)
from training.step import TrainStep, trainable_parameters
from utils.distributed import DistContext, wrap_ddp
from utils.errors import UserError
from utils.lr_scheduler import PolyScheduler

DIM, CLASSES = 8, 6
CPU = torch.device("cpu")


class TinyNet(nn.Module):
    def __init__(self, batch_norm: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.bn = nn.BatchNorm2d(4) if batch_norm else nn.Identity()
        self.fc = nn.Linear(4 * 3 * 3, DIM)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.bn(self.conv(x))), 1))


class Distill(nn.Module):
    """An auxiliary term with a trained parameter: pull a projection of the embedding
    towards a fixed function of the image (a stand-in for a teacher's embedding)."""

    name = "distill"

    def __init__(self, weight: float = 0.5):
        super().__init__()
        self.proj = nn.Linear(DIM, DIM, bias=False)
        self.weight = weight

    def forward(self, images, embeddings, labels):
        target = images.flatten(1)[:, :DIM]
        return self.weight * F.mse_loss(self.proj(embeddings.float()), target)


def _batches(count, batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 3, 8, 8, generator=g), torch.randint(0, CLASSES, (batch,), generator=g))
        for _ in range(count)
    ]


def _setup(*, seed=0, ctx=None, batch_norm=True, aux=False, sample_rate=1.0, scaler=None, acc=1, clip=0.0,
           lr=0.1, max_nonfinite=0, plan=StepPlan(4, 8, 2), global_batch=4):
    """A backbone, head, optimizer, schedule, RunState and TrainStep as train.py builds them."""
    ctx = ctx or DistContext()
    torch.manual_seed(seed)
    backbone = TinyNet(batch_norm)
    terms = [Distill()] if aux else []  # before the head, whose initialisation depends on the world size
    centres = torch.normal(0.0, 0.5, (CLASSES, DIM))  # the same on every rank
    head = PartialFC(CombinedMarginLoss(8.0, 1.0, 0.2, 0.0), DIM, CLASSES, sample_rate,
                     rank=ctx.rank, world_size=ctx.world_size)
    with torch.no_grad():
        head.weight.copy_(centres[head.class_start : head.class_start + head.num_local])
    optimizer = build_optimizer("sgd", trainable_parameters(backbone, terms), head.parameters(), lr=lr,
                                weight_decay=5e-4, momentum=0.9, device_type="cpu")
    scheduler = PolyScheduler(optimizer, lr, plan.schedule_steps, plan.warmup_steps)
    model = wrap_ddp(backbone, ctx) if ctx.is_distributed else backbone
    guard = NonFiniteGuard(max_nonfinite, CPU, backbone.buffers())
    step = TrainStep(model, backbone, head, optimizer, guard=guard, scheduler=scheduler, scaler=scaler,
                     gradient_acc=acc, clip_grad_norm=clip, aux_losses=terms, distributed=ctx.is_distributed)
    info = RunInfo("tiny", DIM, CLASSES, global_batch, acc, plan.schedule_steps)
    state = RunState(backbone, head, optimizer, scheduler, scaler, info=info, plan=plan,
                     rank=ctx.rank, world_size=ctx.world_size, device=CPU, aux_losses=terms)
    backbone.train()
    return state, step, terms


def _weights(*modules):
    return [p.detach().clone() for m in modules for p in m.parameters()]


# --- the plan and the resume arithmetic -------------------------------------------------------

def test_plan_run_caps_at_max_steps_and_refuses_an_empty_epoch():
    assert plan_run(48, 4, 2, 0.5, 1) == StepPlan(12, 24, 6)
    assert plan_run(48, 4, 2, 1.0, 1, max_steps=7) == StepPlan(12, 7, 6)
    assert plan_run(48, 4, 2, 1.0, 1, max_steps=3) == StepPlan(12, 3, 2)  # warm-up stays below the end
    with pytest.raises(TrainingInputError, match="num_image=48 gives no optimizer step per epoch with a global batch of 64") as err:
        plan_run(48, 64, 1, 0, 1)
    assert isinstance(err.value, UserError)


def _checkpoint(epoch, batch, step, *, global_batch=8, acc=1, world=2, run=True):
    state = {"epoch": epoch, "batch_in_epoch": batch, "global_step": step}
    if run:
        state["run"] = {"global_batch_size": global_batch, "gradient_acc": acc}
    if world is not None:
        state["resharded_from_world_size"] = world
    return state


def test_resume_point_without_change_continues_where_the_run_stopped():
    plan = StepPlan(6, 12, 0)
    point = resume_point(_checkpoint(1, 2, 8, world=None), plan, global_batch=8, gradient_acc=1, world_size=2)
    assert point.position == Position(1, 2, 8) and point.schedule_step == 8 and point.total_steps == 12
    assert not point.batch_changed
    assert point.notes("ckpt") == ["resumed from ckpt: epoch 1, batch 2, global step 8"]


def test_resume_point_on_another_global_batch_translates_position_schedule_and_end():
    # tests/test_resilience: 2 ranks x 4 stopped after 2 batches (16 samples); 1 rank x 4,
    # 12 steps per epoch, the schedule capped at 7 steps by max_steps.
    plan = StepPlan(12, 7, 0)
    point = resume_point(_checkpoint(0, 2, 2, global_batch=8, world=2), plan, global_batch=4, gradient_acc=1, world_size=1)
    assert point.position == Position(0, 4, 2)
    assert point.schedule_step == 4  # translate_position's step, not recomputed
    assert point.total_steps == 5 == steps_after_resume(2, 4, 7)
    assert point.notes("ckpt") == [
        "resumed from ckpt: epoch 0, batch 2, global step 2",
        "the checkpoint was saved by 2 ranks with a global batch of 8 x 1 accumulation, this run has 1 rank and "
        "4 x 1: 16 samples of epoch 0 were seen, continuing at batch 4 of epoch 0 (16 samples)",
        "step 2 continues at step 4 of the 7-step learning-rate schedule: the run ends at step 5 (3 remaining)",
    ]
    # Past the new epoch's last whole step: the next epoch. A finished schedule ends at once.
    point = resume_point(_checkpoint(0, 5, 5, global_batch=8, world=1), StepPlan(2, 4, 0), global_batch=16,
                         gradient_acc=1, world_size=1)
    assert point.position == Position(1, 0, 5) and point.schedule_step == 2 and point.total_steps == 7
    assert steps_after_resume(9, 12, 10) == 9


def test_resume_point_of_an_insightface_file_assumes_this_runs_batch():
    # insightface's checkpoint_gpu_0.pt: epoch and global_step only, no run entry
    point = resume_point({"epoch": 3, "global_step": 30}, StepPlan(10, 50, 0), global_batch=8, gradient_acc=1,
                         world_size=2)
    assert point.position == Position(3, 0, 30) and point.schedule_step == 30 and point.total_steps == 50


def test_incompatible_checkpoints_are_refused_with_the_value():
    info = RunInfo("mbf", 128, 12, 8, 1, 6)
    check_compatible({"run": info.as_dict(), "partial_fc": {"num_classes": 12}}, info, "c")
    check_compatible({"epoch": 0}, info, "c")  # insightface's files carry nothing to compare
    for state, message in [
        ({"run": {"network": "r18", "embedding_size": 128}}, "checkpoint c was trained with network='r18', the config has 'mbf'"),
        ({"run": {"network": "mbf", "embedding_size": 64}}, "checkpoint c has embedding_size=64, the config has 128"),
        ({"partial_fc": {"num_classes": 10}}, "checkpoint c has num_classes=10, this run has 12"),
    ]:
        with pytest.raises(TrainingInputError) as err:
            check_compatible(state, info, "c")
        assert str(err.value) == message


# --- the state and its schema -------------------------------------------------------------

SCHEMA = ["epoch", "batch_in_epoch", "global_step", "world_size", "rank", "state_dict_softmax_fc", "partial_fc",
          "state_optimizer", "state_lr_scheduler", "state_scaler", "rng", "run"]


def test_state_dict_keeps_the_checkpoint_schema():
    state, step, _ = _setup()
    for images, labels in _batches(2, 4):
        state.count_batch()
        assert step(images, labels)
        state.count_step(4)
    saved = state.state_dict()
    assert list(saved) == SCHEMA + ["state_dict_backbone"]
    assert (saved["epoch"], saved["batch_in_epoch"], saved["global_step"]) == (0, 2, 2)
    assert saved["partial_fc"] == {"class_start": 0, "num_local": CLASSES, "num_classes": CLASSES, "embedding_size": DIM,
                                   "num_subcenters": 1, "loss": "combined"}
    assert saved["run"] == {"network": "tiny", "embedding_size": DIM, "num_classes": CLASSES, "global_batch_size": 4,
                            "gradient_acc": 1, "total_steps": 8}
    assert saved["state_scaler"] is None and saved["state_lr_scheduler"]["last_epoch"] == 2
    state.rank = 1  # the backbone is in rank 0's file only
    assert list(state.state_dict()) == SCHEMA


def _train_until(state, step, data, stop_at, batches_per_epoch=4, epochs=2):
    """train.py's loop over (epoch, batch) -> batch data, until global step `stop_at`."""
    for epoch in range(state.position.epoch, epochs):
        for b in range(state.begin_epoch(epoch), batches_per_epoch):
            state.count_batch()
            if step(*data[epoch][b]):
                state.count_step(batches_per_epoch)
                if state.position.global_step == stop_at:
                    return


@pytest.mark.parametrize("stop_at", [3, 4])  # in an epoch, at its end
def test_a_run_resumed_from_its_state_dict_ends_with_identical_weights(stop_at):
    data = [_batches(4, 4, seed=10 + epoch) for epoch in range(2)]
    kw = dict(sample_rate=0.5, aux=True, clip=1.0)  # sampling draws random numbers; the aux term trains

    full, full_step, full_terms = _setup(**kw)
    _train_until(full, full_step, data, stop_at=8)

    first, first_step, _ = _setup(**kw)
    _train_until(first, first_step, data, stop_at=stop_at)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # what a checkpoint file holds
    torch.rand(5)  # random numbers drawn after the save must not matter

    resumed, resumed_step, resumed_terms = _setup(seed=123, **kw)  # other initial weights
    point = resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True), source="mem")
    expected = (1, 0) if stop_at == 4 else (0, 3)
    assert (point.position.epoch, point.position.batch_in_epoch) == expected and resumed.schedule_step == stop_at
    _train_until(resumed, resumed_step, data, stop_at=8)

    assert resumed.position == full.position == Position(2, 0, 8)
    for a, b in zip(_weights(full.backbone, full.head, *full_terms), _weights(resumed.backbone, resumed.head, *resumed_terms)):
        assert torch.equal(a, b)
    for a, b in zip(full.backbone.buffers(), resumed.backbone.buffers()):
        assert torch.equal(a, b)


def test_load_state_dict_refuses_another_network_before_changing_anything():
    state, _, _ = _setup()
    saved = state.state_dict()
    saved["run"]["network"] = "r50"
    other, _, _ = _setup(seed=5)
    before = _weights(other.backbone, other.head)
    with pytest.raises(TrainingInputError, match="was trained with network='r50'"):
        other.load_state_dict(saved, source="x")
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(other.backbone, other.head)))


# --- the step ---------------------------------------------------------------------------------

def test_accumulated_half_batches_step_like_the_whole_batch():
    whole, whole_step, _ = _setup(batch_norm=False)
    halves, halves_step, _ = _setup(batch_norm=False, acc=2)
    for images, labels in _batches(3, 8):
        assert whole_step(images, labels)
        assert not halves_step(images[:4], labels[:4])  # gradients only accumulate
        assert halves_step(images[4:], labels[4:])
    for a, b in zip(_weights(whole.backbone, whole.head), _weights(halves.backbone, halves.head)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert halves.scheduler.last_epoch == whole.scheduler.last_epoch == 3


def test_auxiliary_terms_are_trained_logged_and_clipped_with_the_backbone():
    clip, lr, wd = 1e-3, 0.1, 5e-4
    state, step, (term,) = _setup(aux=True, clip=clip, lr=lr, plan=StepPlan(4, 8, 0))
    images, labels = _batches(1, 4)[0]
    with torch.no_grad():
        expected_loss = float(state.head(state.backbone(images), labels))
        expected_term = float(term(images, state.backbone(images), labels))
    before = _weights(state.backbone, term)
    assert step(images, labels) and step.last_lr == lr
    losses = step.take_losses()
    assert list(losses) == ["loss", "distill"]
    assert losses["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert losses["distill"] == pytest.approx(expected_term, rel=1e-5)
    assert all(v != v for v in step.take_losses().values())  # nan: nothing since the last read
    # The first SGD step is w -= lr * (g + wd * w): recover g. The term's weights moved (they
    # are in the optimizer) and g over backbone + term has exactly the clipped norm.
    grads = [-(a - b) / lr - wd * b for a, b in zip(_weights(state.backbone, term), before)]
    assert grads[-1].abs().sum() > 0
    assert torch.cat([g.flatten() for g in grads]).norm() == pytest.approx(clip, rel=1e-3)
    # ... which is a clip: the raw gradient is far larger, the term's part alone too.
    raw, _, (raw_term,) = _setup(aux=True)
    embeddings = raw.backbone(images)
    (raw.head(embeddings, labels) + raw_term(images, embeddings, labels)).backward()
    assert raw_term.proj.weight.grad.norm() > 10 * clip


def test_auxiliary_loss_names_must_be_unique():
    class Term(Distill):
        name = "loss"

    backbone = TinyNet()
    head = PartialFC(CombinedMarginLoss(8.0, 1.0, 0.2, 0.0), DIM, CLASSES)
    optimizer = torch.optim.SGD(backbone.parameters(), lr=0.1)
    guard = NonFiniteGuard(0, CPU, backbone.buffers())
    with pytest.raises(ValueError, match="unique and not 'loss'"):
        TrainStep(backbone, backbone, head, optimizer, guard=guard, aux_losses=[Term()])


def _two_rank_steps(ctx, batches):
    """2 gloo ranks: DDP, sharded head, accumulation over 2 batches, an auxiliary term."""
    state, step, (term,) = _setup(ctx=ctx, batch_norm=False, aux=True, acc=2, clip=5.0)
    half = batches[0][0].shape[0] // 2
    for images, labels in batches:
        mine = slice(ctx.rank * half, (ctx.rank + 1) * half)
        step(images[mine], labels[mine])
    return {"backbone": _weights(state.backbone), "term": _weights(term), "centres": state.head.weight.detach().clone(),
            "loss": step.take_losses()["loss"]}


def test_two_ranks_step_like_one_process_on_the_global_batch():
    batches = _batches(4, 8, seed=3)  # 2 optimizer steps of 2 accumulated global batches of 8
    ranks = run_distributed(_two_rank_steps, 2, batches)

    state, step, (term,) = _setup(batch_norm=False, aux=True, acc=2, clip=5.0)
    for images, labels in batches:
        step(images, labels)
    assert ranks[0]["loss"] == pytest.approx(ranks[1]["loss"], rel=1e-6)
    assert ranks[0]["loss"] == pytest.approx(step.take_losses()["loss"], rel=1e-5)
    for r in ranks:
        for a, b in zip(r["backbone"] + r["term"], _weights(state.backbone) + _weights(term)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.cat([r["centres"] for r in ranks]), state.head.weight.detach(), rtol=1e-4, atol=1e-6)


# --- the non-finite guard ----------------------------------------------------------------------

def test_a_nan_loss_skips_the_update_and_restores_batchnorm_statistics():
    state, step, _ = _setup(clip=5.0)
    (images, labels), (good, good_labels) = _batches(2, 4)
    step(good, good_labels)
    assert step.guard.check(1) is False
    weights, stats = _weights(state.backbone, state.head), [b.clone() for b in state.backbone.buffers()]

    step(torch.full_like(images, float("nan")), labels)
    assert torch.isnan(state.backbone.bn.running_mean).all()  # the forward pass wrote NaN statistics
    assert step.guard.check(2) is True  # ... the step was skipped, the statistics are put back
    assert all(torch.equal(a, b) for a, b in zip(weights, _weights(state.backbone, state.head)))
    assert all(torch.equal(a, b) for a, b in zip(stats, state.backbone.buffers()))
    assert step.guard.skipped_total == 1

    step(good, good_labels)  # training goes on
    assert step.guard.check(3) is False
    assert any(not torch.equal(a, b) for a, b in zip(weights, _weights(state.backbone)))


@pytest.mark.parametrize("clip", [0.0, 5.0])
@pytest.mark.parametrize("sample_rate", [1.0, 0.5])
def test_a_non_finite_head_gradient_with_a_finite_loss_skips_the_update(clip, sample_rate):
    """The head's (dense or sparse row) gradient is checked whether or not clipping is on:
    clipping only covers the backbone. The loss of this step is finite."""
    state, step, _ = _setup(clip=clip, sample_rate=sample_rate)
    (images, labels), (good, good_labels) = _batches(2, 4)
    step(good, good_labels)
    assert step.guard.check(1) is False
    weights = _weights(state.backbone, state.head)
    hook = state.head.weight.register_hook(lambda grad: grad * float("inf"))  # a real inf gradient row
    step(images, labels)
    hook.remove()
    assert torch.isfinite(step.last_loss).all()
    assert step.guard.check(2) is True
    assert all(torch.equal(a, b) for a, b in zip(weights, _weights(state.backbone, state.head)))
    assert torch.isfinite(state.head.weight).all()


def test_max_consecutive_non_finite_steps_stop_the_run():
    state, step, _ = _setup(max_nonfinite=2)
    images, labels = _batches(1, 4)[0]
    bad = torch.full_like(images, float("nan"))
    for batch in (bad, images, bad):  # not consecutive: no stop
        step(batch, labels)
    step.guard.check(3)
    step(bad, labels)
    with pytest.raises(TrainingInputError) as err:
        step.guard.check(4)
    assert str(err.value).startswith(
        "2 consecutive steps up to step 4 had a non-finite loss or gradient (max_nonfinite_steps=2); stopping."
    )


# --- the stop request ---------------------------------------------------------------------------

def test_sigterm_sets_the_stop_request_and_restore_puts_back_the_handler():
    previous = signal.getsignal(signal.SIGTERM)
    stop = StopRequest().install()
    try:
        assert not stop.agreed(DistContext())
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.agreed(DistContext())
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) is previous


def _stop_vote(ctx):
    stop = StopRequest().install()
    try:
        for step in range(1, 10):
            if ctx.rank == 1 and step == 3:
                os.kill(os.getpid(), signal.SIGTERM)  # only rank 1 is pre-empted
            if stop.agreed(ctx):
                return step
        return None
    finally:
        stop.restore()


def test_two_ranks_agree_on_the_step_to_stop():
    # Rank 1's vote of step 3 is read one step later, on both ranks at once.
    assert run_distributed(_stop_vote, 2) == [4, 4]


# --- the progress report --------------------------------------------------------------------------

def test_progress_metrics_go_to_the_log_line_and_the_tracker(tmp_path, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from losses import AdaFaceMargin
    from utils.config import load_config
    from utils.log import SpeedMeter
    from utils.tracking import Tracker

    cfg = load_config("configs/ms1mv3_r50", [f"--output={tmp_path}"])
    tracker = Tracker.create(cfg, DistContext(), str(tmp_path))  # TensorBoard only: using_wandb=False
    logger = logging.getLogger("test_progress")
    report = ProgressReport(logger, SpeedMeter(32, 100), 100, [TrackerSink(tracker)])
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    head = PartialFC(AdaFaceMargin(), DIM, CLASSES)
    head.margin_loss.batch_mean.fill_(21.5)
    figures = margin_figures(head)
    assert figures == {"Margin/batch_mean": 21.5, "Margin/batch_std": 100.0}
    metrics = report.metrics(10, epoch=2, losses={"loss": 12.34, "distill": 0.056}, lr=0.05, scaler=scaler,
                             skipped_nonfinite=1, step_loss=12.5, figures=figures)
    assert {k: metrics[k] for k in ("loss", "distill", "step_loss", "lr", "epoch", "grad_scale", "skipped_nonfinite_steps")} == {
        "loss": 12.34, "distill": 0.056, "step_loss": 12.5, "lr": 0.05, "epoch": 2, "grad_scale": 1024.0,
        "skipped_nonfinite_steps": 1,
    }
    assert metrics["samples_per_sec"] > 0
    with caplog.at_level(logging.INFO, logger="test_progress"):
        report.publish(10, metrics)
    line = caplog.records[-1].getMessage()
    assert line.startswith("step 10/100 (10.0%) | epoch 2 | loss 12.3400 | distill 0.0560 | lr 0.050000 | ")
    assert "| grad scale 1024 | skipped non-finite steps 1 | elapsed " in line and "| ETA " in line
    assert "12.5" not in line and "Margin" not in line  # the step loss and the figures go to the tracker only
    tracker.close()
    assert margin_figures(PartialFC(CombinedMarginLoss(8.0, 1.0, 0.2, 0.0), DIM, CLASSES)) == {}

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = {tag: events.Scalars(tag)[-1] for tag in events.Tags()["scalars"]}
    assert {tag: s.value for tag, s in scalars.items() if tag != "Process/Samples per Second"} == pytest.approx({
        "Loss/Train Loss": 12.34, "Loss/Step Loss": 12.5, "Train/distill": 0.056, "Process/Learning Rate": 0.05,
        "Process/Grad Scale": 1024.0, "Process/Step": 10, "Process/Epoch": 2, "Margin/batch_mean": 21.5,
        "Margin/batch_std": 100.0, "Process/Skipped Non-finite Steps": 1,
    })
    assert scalars["Process/Samples per Second"].value == pytest.approx(metrics["samples_per_sec"])
    assert {s.step for s in scalars.values()} == {10}


# --- pretrained weights -----------------------------------------------------------------------------

def test_load_pretrained_backbone_and_class_centres(tmp_path):
    from backbones.weights import WeightsError
    from training.state import load_pretrained
    from utils.checkpoint import CheckpointError

    source, _, _ = _setup(seed=7)
    torch.save({f"module.{k}": v for k, v in source.backbone.state_dict().items()}, tmp_path / "ddp.pth")
    torch.save({"state_dict_softmax_fc": source.head.state_dict()}, tmp_path / "merged.pt")
    state, _, _ = _setup(seed=0)
    notes = load_pretrained(state.backbone, state.head, backbone_path=str(tmp_path / "ddp.pth"),
                            head_path=str(tmp_path / "merged.pt"), network="tiny")
    assert notes == [f"backbone initialised from {tmp_path / 'ddp.pth'}", f"class centres initialised from {tmp_path / 'merged.pt'}"]
    assert all(torch.equal(a, b) for a, b in zip(_weights(state.backbone, state.head), _weights(source.backbone, source.head)))

    torch.save(TinyNet(batch_norm=False).state_dict(), tmp_path / "other.pth")
    with pytest.raises(WeightsError, match=r"pretrained weights .*other.pth: the weights do not fit network 'tiny': missing: bn\."):
        load_pretrained(state.backbone, state.head, backbone_path=str(tmp_path / "other.pth"), head_path=None, network="tiny")
    torch.save({"weight": torch.zeros(CLASSES + 1, DIM)}, tmp_path / "wrong.pt")
    with pytest.raises(TrainingInputError, match=r"wrong.pt has class centres of shape \(7, 8\), this run needs \(6, 8\)"):
        load_pretrained(state.backbone, state.head, backbone_path=None, head_path=str(tmp_path / "wrong.pt"), network="tiny")
    (tmp_path / "corrupt.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="cannot read pretrained class centres .*corrupt.pt"):
        load_pretrained(state.backbone, state.head, backbone_path=None, head_path=str(tmp_path / "corrupt.pt"), network="tiny")


def test_the_backbone_decides_channels_last():
    from backbones.iresnet import IResNet
    from backbones.mobilefacenet import MobileFaceNet
    from backbones.vit import VisionTransformer

    assert IResNet.prefers_channels_last and MobileFaceNet.prefers_channels_last
    assert VisionTransformer.prefers_channels_last is False
