import pytest
import torch

from utils.lr_scheduler import PolyScheduler, plan_steps


def _lrs(base_lr, max_steps, warmup, n):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    sched = PolyScheduler(opt, base_lr, max_steps, warmup)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_is_linear_and_never_zero():
    lrs = _lrs(0.1, 100, 10, 100)
    assert lrs[0] == pytest.approx(0.01)
    assert lrs[:10] == pytest.approx([0.01 * (i + 1) for i in range(10)])
    assert lrs[10] == pytest.approx(0.1)
    assert min(lrs) > 0, "no planned step may run at lr 0"


def test_polynomial_decay_power_two():
    lrs = _lrs(0.2, 50, 0, 50)
    for s, lr in enumerate(lrs):
        assert lr == pytest.approx(0.2 * (1 - s / 50) ** 2)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] == pytest.approx(0.2 / 50**2)


def test_never_rises_or_goes_negative_past_max_steps():
    lrs = _lrs(0.1, 20, 5, 40)
    assert all(lr >= 0 for lr in lrs)
    assert all(b <= a for a, b in zip(lrs[5:], lrs[6:]))
    assert lrs[20:] == [0.0] * 20


def _run_state(max_steps, warmup, global_batch=4, steps_per_epoch=None):
    """A RunState as train.py builds it, with a parameter-free backbone stand-in."""
    from losses import CombinedMarginLoss, PartialFC
    from training.state import RunInfo, RunState, StepPlan

    backbone = torch.nn.Linear(2, 2)
    head = PartialFC(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), 2, 4)
    opt = torch.optim.SGD([{"params": backbone.parameters()}, {"params": head.parameters()}], lr=0.1)
    sched = PolyScheduler(opt, 0.1, max_steps, warmup)
    plan = StepPlan(steps_per_epoch or max_steps, max_steps, warmup)
    info = RunInfo("linear", 2, 4, global_batch, 1, max_steps)
    return RunState(backbone, head, opt, sched, None, info=info, plan=plan, rank=0, world_size=1,
                    device=torch.device("cpu"))


def _step(state, n):
    """n optimizer steps as the training step takes them; the lr each one used."""
    used = []
    for _ in range(n):
        used.append(state.optimizer.param_groups[0]["lr"])
        state.optimizer.step()
        state.scheduler.step()
        state.count_batch()
        state.count_step(state.plan.steps_per_epoch)
    return used


def test_resume_through_the_run_state_continues_the_curve():
    full = _lrs(0.1, 30, 4, 30)
    first = _run_state(30, 4)
    assert _step(first, 12) == pytest.approx(full[:12])
    resumed = _run_state(30, 4)
    resumed.load_state_dict(first.state_dict())  # train.py's resume path; no lr is set by hand
    assert resumed.schedule_step == 12 and resumed.total_steps == 30
    assert _step(resumed, 18) == pytest.approx(full[12:])
    assert resumed.optimizer.param_groups[0]["lr"] == 0.0  # past the plan


def test_resume_on_another_global_batch_continues_the_new_plans_curve():
    # saved at batch 12 of 4 samples (48 samples); the new run has batches of 8: 15 steps
    # per epoch, and continues at its step 6 with 9 steps left
    first = _run_state(30, 4)
    _step(first, 12)
    resumed = _run_state(15, 2, global_batch=8)
    point = resumed.load_state_dict(first.state_dict())
    assert (point.position.batch_in_epoch, point.schedule_step, point.total_steps) == (6, 6, 21)
    assert _step(resumed, 9) == pytest.approx(_lrs(0.1, 15, 2, 15)[6:])
    assert resumed.position.global_step == resumed.total_steps == 21


def test_plan_steps_matches_insightface_arithmetic():
    # MS1MV3 on 8 GPUs x 128, 20 epochs, 2 warm-up epochs
    per_epoch, total, warmup = plan_steps(5179510, 1024, 20, 2)
    assert per_epoch == 5179510 // 1024 and total == per_epoch * 20 and warmup == per_epoch * 2
    per_epoch, total, _ = plan_steps(1000, 100, 3, 0, gradient_acc=2)
    assert (per_epoch, total) == (5, 15)
    with pytest.raises(ValueError, match="num_image=10"):
        plan_steps(10, 64, 1, 0)


def test_invalid_arguments():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError):
        PolyScheduler(opt, 0.1, 10, 10)
