import math

import pytest
import torch

from losses.margin import ACOS_GRAD_EDGE, CombinedMarginLoss



@pytest.fixture(autouse=True)
def _float64_default():
    """Gradients are compared in float64; the default dtype is restored for the other test modules."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _insightface_reference(cos, labels, s, m1, m2, m3):
    """The forward values insightface's CombinedMarginLoss produces (ArcFace / CosFace)."""
    out = cos.clone()
    rows = torch.nonzero(labels != -1, as_tuple=True)[0]
    t = out[rows, labels[rows]]
    if m1 == 1.0 and m3 == 0.0:
        t = torch.cos(torch.acos(t) + m2)
    else:
        t = t - m3
    out[rows, labels[rows]] = t
    return out * s


def _cosines(n=6, c=9, seed=0, low=-0.7, high=0.95):
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(n, c, generator=g)


LABELS = torch.tensor([0, 3, -1, 8, 3, -1])


@pytest.mark.parametrize("margins", [(1.0, 0.5, 0.0), (1.0, 0.0, 0.4)], ids=["arcface", "cosface"])
def test_forward_equals_insightface(margins):
    cos = _cosines()
    loss = CombinedMarginLoss(64.0, *margins)
    out = loss(cos.clone(), LABELS)
    torch.testing.assert_close(out, _insightface_reference(cos, LABELS, 64.0, *margins))


@pytest.mark.parametrize("margins", [(1.0, 0.5, 0.0), (1.0, 0.0, 0.4), (1.0, 0.3, 0.2), (1.35, 0.2, 0.1), (0.9, 0.4, 0.0)])
def test_gradient_is_exact_derivative_of_the_plain_formula(margins):
    m1, m2, m3 = margins
    s = 30.0
    cos = _cosines(seed=1, low=-0.2)
    loss = CombinedMarginLoss(s, m1, m2, m3)
    x = cos.clone().requires_grad_()
    weights = torch.randn_like(cos)
    (loss(x.clone(), LABELS) * weights).sum().backward()

    y = cos.clone().requires_grad_()
    rows = torch.nonzero(LABELS != -1, as_tuple=True)[0]
    target_mask = torch.zeros_like(cos, dtype=torch.bool)
    target_mask[rows, LABELS[rows]] = True
    # only interior targets, m1*theta + m2 < pi: there the plain formula is the definition
    assert torch.all(m1 * torch.acos(cos[target_mask]) + m2 < math.pi)
    plain = torch.where(target_mask, torch.cos(m1 * torch.acos(y) + m2) - m3, y) * s
    (plain * weights).sum().backward()

    torch.testing.assert_close(x.grad, y.grad)
    # and it is not a straight-through copy: the target gradients differ from s * weights
    if m1 != 1.0 or m2 != 0.0:
        assert not torch.allclose(x.grad[target_mask], s * weights[target_mask])


@pytest.mark.parametrize("margins", [(1.0, 0.5, 0.0), (1.5, 0.3, 0.0), (1.0, 0.5, 0.2)])
def test_target_logit_beyond_pi_is_continuous_and_monotonic(margins):
    loss = CombinedMarginLoss(1.0, *margins)
    cos = torch.linspace(-1.0, 1.0, 20001, requires_grad=True)
    target = loss.target_logit(cos)
    assert torch.isfinite(target).all()
    diffs = target[1:] - target[:-1]
    assert (diffs >= -1e-12).all(), "a better (larger) cosine must never give a smaller target logit"
    assert diffs.abs().max() < 0.05, "no jump"
    at = loss.cos_theta_max
    near = torch.tensor([at - 1e-9, at + 1e-9])
    lo, hi = loss.target_logit(near)
    assert abs(float(hi - lo)) < 1e-6
    target.sum().backward()
    assert torch.isfinite(cos.grad).all()


def test_aligned_target_is_exact_and_keeps_a_bounded_nonzero_gradient():
    s, m = 64.0, 0.5
    loss = CombinedMarginLoss(s, 1.0, m, 0.0)
    x = torch.tensor([[1.0, 0.2], [1.0 + 1e-7, 0.1], [ACOS_GRAD_EDGE, 0.3]], requires_grad=True)
    out = loss(x.clone(), torch.tensor([0, 0, 0]))
    values = out.detach()
    # the forward is exact: s*cos(m) at cos = 1 (and at 1 + rounding), not s*cos(acos(1 - eps) + m)
    assert float(values[0, 0]) == pytest.approx(s * math.cos(m), rel=1e-14)
    assert float(values[1, 0]) == pytest.approx(s * math.cos(m), rel=1e-14)
    out[:, 0].sum().backward()
    # d/dx s*cos(acos(x) + m) = s*sin(acos(x) + m) / sqrt(1 - x^2): held at its value at the edge
    edge = s * math.sin(math.acos(ACOS_GRAD_EDGE) + m) / math.sqrt(1 - ACOS_GRAD_EDGE**2)
    at_one = s * math.sin(m) / math.sqrt(1 - ACOS_GRAD_EDGE**2)
    assert float(x.grad[2, 0]) == pytest.approx(edge, rel=1e-6)
    assert float(x.grad[0, 0]) == pytest.approx(at_one, rel=1e-6) and float(x.grad[1, 0]) == pytest.approx(at_one, rel=1e-6)
    assert at_one > 100  # neither zero (the old clamp) nor infinite (the exact derivative)


def test_interclass_filtering_zeroes_hard_negatives_but_never_the_own_class():
    cos = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.95, 0.6], [0.7, 0.3, 0.45]])
    labels = torch.tensor([0, 2, -1])
    loss = CombinedMarginLoss(1.0, 1.0, 0.0, 0.0, interclass_filtering_threshold=0.4)
    out = loss(cos.clone(), labels)
    expected = torch.tensor([[0.9, 0.0, 0.1], [0.2, 0.0, 0.6], [0.0, 0.3, 0.0]])
    torch.testing.assert_close(out, expected)


def test_rows_without_a_local_target_are_only_scaled():
    cos = _cosines()
    out = CombinedMarginLoss(10.0, 1.0, 0.5, 0.0)(cos.clone(), torch.full((6,), -1))
    torch.testing.assert_close(out, cos * 10.0)


def test_invalid_parameters():
    with pytest.raises(ValueError, match="scale"):
        CombinedMarginLoss(0.0, 1.0, 0.5, 0.0)
    with pytest.raises(ValueError, match="m1"):
        CombinedMarginLoss(64.0, 0.0, 0.5, 0.0)
