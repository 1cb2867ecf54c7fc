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


def test_resume_from_state_dict_continues_the_curve():
    full = _lrs(0.1, 30, 4, 30)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = PolyScheduler(opt, 0.1, 30, 4)
    for _ in range(12):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched2 = PolyScheduler(opt2, 0.1, 30, 4)
    sched2.load_state_dict(state)
    # load_state_dict restores the counter; the optimizer's lr follows at the next step
    rest = []
    for _ in range(18):
        opt2.param_groups[0]["lr"] = sched2.lr_at(sched2.last_epoch)
        rest.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert rest == pytest.approx(full[12:])


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
