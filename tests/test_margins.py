"""Every margin on the PartialFC head against an independent dense restatement of its formula
(tests/margin_references.py): loss and both gradients (embeddings and centres), one process
and two gloo ranks against one process on the global batch, over several steps for the
stateful margins, with sampling and with sub-centres; gradcheck of each margin's own
function; the references' quirks; margin state in checkpoints, also across world sizes."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import margin_references as ref
from helpers import run_distributed
from losses import GlobalBatch, PartialFC, get_margin, loss_parameters
from losses.partial_fc import shard_range
from losses.reshard import split
from utils.checkpoint import CheckpointError

DIM, NUM_CLASSES, LOCAL_BATCH, STEPS, SEED = 6, 11, 4, 3, 5
RTOL, ATOL = 1e-5, 1e-9

# key -> (loss name, parameters). s = 16 keeps the softmax away from saturation, so that the
# gradients being compared are not all tiny.
MARGINS = {
    "combined": ("combined", dict(s=16.0, m1=1.0, m2=0.3, m3=0.1)),
    "arcface": ("arcface", dict(s=16.0, m=0.5)),
    "cosface": ("cosface", dict(s=16.0, m=0.4)),
    "adaface": ("adaface", dict(s=16.0, m=0.4, h=0.333, t_alpha=0.3)),
    "magface": ("magface", dict(s=16.0, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=35.0)),
    "curricularface": ("curricularface", dict(s=16.0, m=0.5)),
    "elasticface_arc": ("elasticface_arc", dict(s=16.0, m=0.5, std=0.05, plus=False)),
    "elasticface_cos": ("elasticface_cos", dict(s=16.0, m=0.35, std=0.05, plus=False)),
    "elasticface_arc_plus": ("elasticface_arc", dict(s=16.0, m=0.5, std=0.1, plus=True)),
    "elasticface_cos_plus": ("elasticface_cos", dict(s=16.0, m=0.35, std=0.1, plus=True)),
}
# (margin key, num_subcenters, sample_rate, logits_chunk_rows). Chunks of 3 rows split the
# global batch (4 or 8 rows) into uneven blocks (losses/chunked_logits.py).
HEAD_CASES = ([(key, 1, 1.0, 0) for key in MARGINS] + [(key, 3, 0.5, 0) for key in MARGINS]
              + [(key, 1, 1.0, 3) for key in MARGINS] + [(key, 3, 0.5, 3) for key in MARGINS])
CASE_IDS = [f"{k}-K{n}-rate{r}" + (f"-chunk{c}" if c else "") for k, n, r, c in HEAD_CASES]


def _margin(key):
    name, params = MARGINS[key]
    return get_margin(name, **params, **({"seed": SEED} if name.startswith("elasticface") else {}))


def _data(step, world_size, num_subcenters):
    """The global batch of `step` (norms spread over [4, 130]: both sides of MagFace's
    [10, 110] and AdaFace's statistics) and the centres."""
    g = torch.Generator().manual_seed(1000 * num_subcenters + step)
    n = world_size * LOCAL_BATCH
    directions = torch.nn.functional.normalize(torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=1)
    norms = 4.0 + 126.0 * torch.rand(n, generator=g, dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    centres = torch.randn(NUM_CLASSES * num_subcenters, DIM, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return directions * norms.unsqueeze(1), labels, centres


def _head(key, num_subcenters, sample_rate, rank, world_size, chunk_rows=0):
    head = PartialFC(_margin(key), DIM, NUM_CLASSES, sample_rate, num_subcenters=num_subcenters,
                     logits_chunk_rows=chunk_rows, rank=rank, world_size=world_size).double()
    _, _, centres = _data(0, world_size, num_subcenters)
    start, count = shard_range(NUM_CLASSES, rank, world_size)
    with torch.no_grad():
        head.weight.copy_(centres[start * num_subcenters:(start + count) * num_subcenters])
    return head


def _steps(head, world_size, rank, first_step, steps, num_subcenters):
    """Run `steps` forward/backward passes; per step: loss, local embedding gradient, the
    centre gradient's rows (global row ids) and values."""
    out = []
    start = head.class_start * num_subcenters
    for step in range(first_step, first_step + steps):
        embeddings, labels, _ = _data(step, world_size, num_subcenters)
        sl = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        local = embeddings[sl].clone().requires_grad_()
        loss = head(local, labels[sl])
        loss.backward()
        grad = head.weight.grad
        if grad.is_sparse:
            grad = grad.coalesce()
            rows, values = grad.indices()[0], grad.values()
        else:
            rows, values = torch.arange(grad.shape[0]), grad
        out.append({"loss": loss.detach(), "emb_grad": local.grad, "rows": rows + start, "values": values.clone()})
        head.weight.grad = None
    return out


def _margin_state(head):
    state = head.margin_loss.state_dict()
    return {k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in state.items()}


def _run_cases(ctx, cases):
    results = {}
    for key, k, sample_rate, chunk in cases:
        torch.manual_seed(100 + ctx.rank)  # ranks sample their negatives independently
        head = _head(key, k, sample_rate, ctx.rank, ctx.world_size, chunk)
        results[(key, k, sample_rate, chunk)] = {"steps": _steps(head, ctx.world_size, ctx.rank, 0, STEPS, k),
                                          "state": _margin_state(head)}
    return results


def _check_against_reference(per_rank, key, num_subcenters, sample_rate, chunk_rows, world_size):
    name, params = MARGINS[key]
    params = {**loss_parameters(name), **params}
    state = ref.initial_state(name, SEED)
    for step in range(STEPS):
        embeddings, labels, centres = _data(step, world_size, num_subcenters)
        results = [r["steps"][step] for r in per_rank]
        rows = torch.cat([r["rows"] for r in results]).sort().values
        if sample_rate < 1.0:
            classes = torch.unique(rows // num_subcenters)
            assert set(labels.tolist()) <= set(classes.tolist()), "every positive class is sampled"
            assert torch.equal(rows, ref_rows(classes, num_subcenters)), "a class's K sub-centres are sampled together"
        else:
            classes = torch.arange(NUM_CLASSES)
        w = centres.clone().requires_grad_()
        emb = embeddings.clone().requires_grad_()
        used = w[ref_rows(classes, num_subcenters)]
        loss, state = ref.reference_loss(name, params, emb, used, torch.searchsorted(classes, labels), num_subcenters, state)
        loss.backward()
        for rank, r in enumerate(results):
            torch.testing.assert_close(r["loss"], loss.detach(), rtol=RTOL, atol=ATOL)
            # PartialFC's convention: the local gradient times the world size (DDP averages it)
            sl = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
            torch.testing.assert_close(r["emb_grad"] / world_size, emb.grad[sl], rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(r["values"], w.grad[r["rows"]], rtol=RTOL, atol=ATOL)
        unsampled = torch.ones(w.shape[0], dtype=torch.bool)
        unsampled[rows] = False
        assert torch.all(w.grad[unsampled] == 0)
    _check_state(per_rank, name, state)


def ref_rows(classes, num_subcenters):
    return (classes.unsqueeze(1) * num_subcenters + torch.arange(num_subcenters)).reshape(-1)


def _check_state(per_rank, name, state):
    saved = [r["state"] for r in per_rank]
    for other in saved[1:]:  # the same on every rank, bit for bit
        assert other.keys() == saved[0].keys()
        for k, v in saved[0].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(other[k], v), k
            else:
                assert torch.equal(other[k]["generator"], v["generator"]), k
    if name == "adaface":
        torch.testing.assert_close(saved[0]["batch_mean"], state[0], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(saved[0]["batch_std"], state[1], rtol=RTOL, atol=ATOL)
    elif name == "curricularface":
        torch.testing.assert_close(saved[0]["t"], state, rtol=RTOL, atol=ATOL)
    elif name.startswith("elasticface"):
        assert torch.equal(saved[0]["_extra_state"]["generator"], state.get_state())


@pytest.fixture(scope="module")
def single_process_results():
    from utils.distributed import DistContext

    return _run_cases(DistContext(), HEAD_CASES)


@pytest.fixture(scope="module")
def two_rank_results():
    return run_distributed(_run_cases, 2, HEAD_CASES)


@pytest.mark.parametrize("case", HEAD_CASES, ids=CASE_IDS)
def test_one_process_matches_the_reference(case, single_process_results):
    _check_against_reference([single_process_results[case]], *case, world_size=1)


@pytest.mark.parametrize("case", HEAD_CASES, ids=CASE_IDS)
def test_two_ranks_match_one_process_on_the_global_batch(case, two_rank_results):
    _check_against_reference([r[case] for r in two_rank_results], *case, world_size=2)


# --- gradcheck of each margin's own function ------------------------------------------------

@pytest.mark.parametrize("key", list(MARGINS))
def test_gradcheck(key):
    g = torch.Generator().manual_seed(3)
    margin = _margin(key).double()
    cos = (-0.8 + 1.7 * torch.rand(5, 7, generator=g, dtype=torch.float64)).requires_grad_()
    targets = torch.tensor([0, 3, -1, 6, 3])
    # Only MagFace differentiates the norm (AdaFace detaches it, as its reference does).
    norms = (5.0 + 120.0 * torch.rand(5, generator=g, dtype=torch.float64)).requires_grad_(margin.name == "magface")
    fixed_targets = GlobalBatch.local_target_cosines(cos, targets)  # batch statistics: not differentiated
    snapshot = copy.deepcopy(margin.state_dict())

    def f(c, n):
        margin.load_state_dict(snapshot)  # the same state (and random draws) on every call
        batch = GlobalBatch(norms=n, target_cosines=fixed_targets)
        logits = margin(c.clone(), targets, batch)
        extra = margin.regularizer(batch)
        return logits, (extra if extra is not None else logits.sum() * 0)

    assert torch.autograd.gradcheck(f, (cos, norms))


# --- the exact ArcFace forward ----------------------------------------------------------------

@pytest.mark.parametrize(
    "name, params, expected",
    [
        ("arcface", dict(s=64.0, m=0.5), 64.0 * math.cos(0.5)),
        ("combined", dict(s=64.0, m1=1.0, m2=0.5, m3=0.0), 64.0 * math.cos(0.5)),
        ("combined", dict(s=30.0, m1=1.2, m2=0.3, m3=0.1), 30.0 * (math.cos(0.3) - 0.1)),
        ("magface", dict(s=64.0, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8), 64.0 * math.cos(0.45)),
        ("curricularface", dict(s=64.0, m=0.5), 64.0 * math.cos(0.5)),
        ("elasticface_arc", dict(s=64.0, m=0.5, std=0.0), 64.0 * math.cos(0.5)),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_aligned_target_is_exact_with_a_bounded_nonzero_gradient(name, params, expected, dtype):
    margin = get_margin(name, **params).to(dtype).eval()  # eval: ElasticFace uses m itself
    # cos = 1 exactly, and 1 + 1 ulp-ish (what a float32 matmul of unit vectors can return)
    cos = torch.tensor([[1.0, 0.2], [1.0 + 1e-7, 0.1]], dtype=dtype, requires_grad=True)
    norms = torch.tensor([10.0, 10.0], dtype=dtype)  # MagFace: the margin at l_a is l_m
    out = margin(cos.clone(), torch.tensor([0, 0]), GlobalBatch(norms=norms))
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    values = out.detach()[:, 0]
    assert torch.all((values - expected).abs() < tol * abs(expected)), values
    out[:, 0].sum().backward()
    grad = cos.grad[:, 0]
    assert torch.isfinite(grad).all() and torch.all(grad.abs() > 1.0), grad  # bounded, not zero
    assert torch.all(grad.abs() < 1e5)


def test_issue_example_arcface_at_cos_one_is_s_cos_m():
    # s=64, m=0.5, target cosine 1.0: s*cos(m) = 56.17, not 56.12 (the old clamp before acos)
    out = get_margin("arcface", s=64.0, m=0.5)(torch.tensor([[1.0]]), torch.tensor([0]))
    assert abs(float(out) - 64 * math.cos(0.5)) < 1e-4


# --- the references' quirks -------------------------------------------------------------------

def test_adaface_clamps_every_cosine_and_updates_its_statistics_before_use():
    margin = get_margin("adaface", s=1.0, m=0.4, h=0.333, t_alpha=0.5).double()
    cos = torch.tensor([[0.5, 0.9999, -0.99995], [0.2, 0.1, 0.3], [0.0, 0.4, 0.6]], dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 2, 1])
    norms = torch.tensor([30.0, 5.0, 250.0], dtype=torch.float64, requires_grad=True)
    assert float(margin.batch_mean) == 20.0 and float(margin.batch_std) == 100.0
    out = margin(cos.clone(), targets, GlobalBatch(norms=norms))
    values = out.detach()
    clipped = torch.tensor([30.0, 5.0, 100.0], dtype=torch.float64)  # norms clipped to [0.001, 100]
    mean, std = 0.5 * clipped.mean() + 0.5 * 20.0, 0.5 * clipped.std(unbiased=True) + 0.5 * 100.0
    torch.testing.assert_close(margin.batch_mean, mean)
    torch.testing.assert_close(margin.batch_std, std)
    # a non-target cosine of 0.9999 is 1 - 1e-3 and passes no gradient
    assert float(values[0, 1]) == pytest.approx(0.999) and float(values[0, 2]) == pytest.approx(-0.999)
    # the target uses the statistics of *this* batch already
    scaler = torch.clamp(0.333 * (clipped[0] - mean) / (std + 1e-3), -1, 1)
    expected = math.cos(math.acos(0.5) - 0.4 * float(scaler)) - 0.4 - 0.4 * float(scaler)
    assert float(values[0, 0]) == pytest.approx(expected, rel=1e-12)
    out.sum().backward()
    assert cos.grad[0, 1] == 0 and cos.grad[0, 2] == 0 and cos.grad[1, 1] == 1
    assert norms.grad is None or torch.all(norms.grad == 0)  # the norms are detached
    margin.eval()
    margin(cos.detach().clone(), targets, GlobalBatch(norms=norms))
    torch.testing.assert_close(margin.batch_mean, mean)  # no update in eval mode


def test_magface_easy_margin_and_the_gradient_through_the_norm():
    margin = get_margin("magface", s=1.0).double()
    cos = torch.tensor([[0.6, 0.1], [-0.3, 0.2], [0.6, 0.1], [0.6, 0.1]], dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 0, 0, 0])
    norms = torch.tensor([50.0, 50.0, 5.0, 200.0], dtype=torch.float64, requires_grad=True)
    batch = GlobalBatch(norms=norms)
    out = margin(cos.clone(), targets, batch)
    values = out.detach()
    m50 = 0.45 + (50 - 10) * 0.35 / 100
    assert float(values[0, 0]) == pytest.approx(math.cos(math.acos(0.6) + m50), rel=1e-12)
    assert float(values[1, 0]) == -0.3  # cos <= 0: no margin (easy_margin)
    assert float(values[2, 0]) == pytest.approx(math.cos(math.acos(0.6) + 0.45), rel=1e-12)  # a clamped to l_a
    assert float(values[3, 0]) == pytest.approx(math.cos(math.acos(0.6) + 0.8), rel=1e-12)  # a clamped to u_a
    reg = margin.regularizer(batch)
    a = torch.tensor([50.0, 50.0, 10.0, 110.0], dtype=torch.float64)
    torch.testing.assert_close(reg, 35.0 * (a / 110**2 + 1 / a).mean())
    (out[:, 0].sum() + reg).backward()
    assert norms.grad[0] != 0 and norms.grad[1] != 0  # through g, and (row 0) through m(a)
    assert norms.grad[2] == 0 and norms.grad[3] == 0  # outside [l_a, u_a] the clamp holds it


def test_curricularface_t_hard_negatives_and_the_far_branch():
    m = 0.5
    margin = get_margin("curricularface", s=1.0, m=m).double()
    cos = torch.tensor([[0.5, 0.6, 0.2], [-0.95, 0.1, -0.99]], dtype=torch.float64)
    targets = torch.tensor([0, 0])
    out = margin(cos.clone(), targets)
    t = 0.01 * (0.5 - 0.95) / 2  # starts at 0, updated before use
    assert float(margin.t) == pytest.approx(t, rel=1e-12)
    with_margin = math.cos(math.acos(0.5) + m)
    assert float(out[0, 0]) == pytest.approx(with_margin, rel=1e-12)
    assert 0.2 > with_margin  # both negatives of row 0 are hard: above cos(theta + m)
    assert float(out[0, 1]) == pytest.approx(0.6 * (t + 0.6), rel=1e-12)
    assert float(out[0, 2]) == pytest.approx(0.2 * (t + 0.2), rel=1e-12)
    far = -0.95 - m * math.sin(m)  # cos(theta) <= cos(pi - m): cos - m*sin(m)
    assert float(out[1, 0]) == pytest.approx(far, rel=1e-12)
    # the hard-negative test uses cos(theta + m) even on the far branch: -0.9836
    threshold = math.cos(math.acos(-0.95) + m)
    assert -0.99 < threshold < 0.1
    assert float(out[1, 1]) == pytest.approx(0.1 * (t + 0.1), rel=1e-12)
    assert float(out[1, 2]) == -0.99


def test_elasticface_draws_are_seeded_unclamped_and_restored_from_the_state():
    margin = get_margin("elasticface_cos", s=1.0, m=0.35, std=2.0, seed=11).double()
    cos = torch.full((64, 3), 0.25, dtype=torch.float64)
    targets = torch.zeros(64, dtype=torch.long)
    state = copy.deepcopy(margin.state_dict())
    first = 0.25 - margin(cos.clone(), targets)[:, 0]
    draws = ref.elastic_draws(torch.Generator().manual_seed(11), 64, 0.35, 2.0)
    torch.testing.assert_close(first, draws)
    assert (first < 0).any(), "a draw below zero stays below zero (not clamped)"
    second = 0.25 - margin(cos.clone(), targets)[:, 0]
    assert not torch.equal(first, second), "a fresh margin every step"
    again = get_margin("elasticface_cos", s=1.0, m=0.35, std=2.0, seed=999).double()
    again.load_state_dict(state)  # the checkpointed generator (and seed) win over the new seed
    torch.testing.assert_close(0.25 - again(cos.clone(), targets)[:, 0], first)
    margin.eval()
    assert torch.all(margin(cos.clone(), targets)[:, 0] == 0.25 - 0.35), "eval mode: the mean margin"


def test_elasticface_plus_hands_out_margins_as_the_reference_indexes_them():
    # target cosines of rows 0, 1, 2: 0.1, 0.9, 0.5 -> rows by cosine, descending: 1, 2, 0
    target_cosines = torch.tensor([0.1, 0.9, 0.5])
    draws = torch.tensor([0.30, 0.10, 0.20])  # sorted: 0.10, 0.20, 0.30
    from losses.elasticface import ElasticFaceMargin

    handed = ElasticFaceMargin.plus_assignment(draws, target_cosines)
    assert handed.tolist() == pytest.approx([0.20, 0.30, 0.10])  # row i gets sorted[order[i]]


# --- checkpoints ----------------------------------------------------------------------------

@pytest.mark.parametrize("key, keys", [
    ("combined", ["weight"]),
    ("adaface", ["weight", "margin_loss.batch_mean", "margin_loss.batch_std"]),
    ("curricularface", ["weight", "margin_loss.t"]),
    ("elasticface_arc", ["weight", "margin_loss._extra_state"]),
])
def test_margin_state_round_trips_through_the_head_state_dict(key, keys, tmp_path):
    head = _head(key, 2, 1.0, 0, 1)
    _steps(head, 1, 0, 0, 2, 2)
    path = tmp_path / "head.pt"
    torch.save(head.state_dict(), path)
    saved = torch.load(path, weights_only=True)
    assert sorted(saved) == sorted(keys)
    expected = _steps(head, 1, 0, 2, 2, 2)  # the uninterrupted run
    fresh = _head(key, 2, 1.0, 0, 1)
    fresh.load_state_dict(saved)
    for a, b in zip(_steps(fresh, 1, 0, 2, 2, 2), expected):
        torch.testing.assert_close(a["loss"], b["loss"], rtol=0, atol=0)
        torch.testing.assert_close(a["emb_grad"], b["emb_grad"], rtol=0, atol=0)


def test_a_head_that_does_not_fit_is_a_one_line_checkpoint_error():
    combined = _head("combined", 1, 1.0, 0, 1)
    old = {"weight": combined.weight.detach().clone()}  # what a checkpoint without margin state holds
    combined.load_state_dict(old)
    with pytest.raises(CheckpointError, match=r"missing \['margin_loss.batch_mean', 'margin_loss.batch_std'\].*'adaface'"):
        _head("adaface", 1, 1.0, 0, 1).load_state_dict(old)
    with pytest.raises(CheckpointError, match=r"unexpected \['margin_loss.t'\]"):
        combined.load_state_dict(_head("curricularface", 1, 1.0, 0, 1).state_dict())
    with pytest.raises(CheckpointError, match=r"\(1 sub-centres per class\), this run expects \(33, 6\).*num_subcenters=3"):
        _head("combined", 3, 1.0, 0, 1).load_state_dict(old)


RESUMED = ["adaface", "curricularface", "elasticface_arc_plus"]


def _resume_on_two_ranks(ctx, keys, k):
    """Per margin: steps 0-1 on one process, its checkpoint split for 2 ranks, steps 2-3 on 2 ranks."""
    results = {}
    for key in keys:
        one = _head(key, k, 1.0, 0, 1)
        _steps(one, 1, 0, 0, 2, k)
        state = {"state_dict_softmax_fc": one.state_dict(), "partial_fc": one.shard_metadata(), "rank": 0, "world_size": 1}
        mine = split(copy.deepcopy(state), ctx.world_size)[ctx.rank]
        head = _head(key, k, 1.0, ctx.rank, ctx.world_size)
        head.load_state_dict(mine["state_dict_softmax_fc"])
        results[key] = _steps(head, ctx.world_size, ctx.rank, 2, 2, k)
    return results


@pytest.fixture(scope="module")
def resumed_on_two_ranks():
    return run_distributed(_resume_on_two_ranks, 2, RESUMED, 2)


@pytest.mark.parametrize("key", RESUMED)
def test_resume_on_another_world_size_continues_the_margin_state(key, resumed_on_two_ranks):
    k = 2
    one = _head(key, k, 1.0, 0, 1)  # the uninterrupted run: steps 0-1 as saved, then the 2-rank global batches
    _steps(one, 1, 0, 0, 2, k)
    for step, expected in enumerate(_steps_on_global_batches(one, 2, k)):
        for rank in range(2):
            got = resumed_on_two_ranks[rank][key][step]
            torch.testing.assert_close(got["loss"], expected["loss"], rtol=RTOL, atol=ATOL)
            sl = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
            torch.testing.assert_close(got["emb_grad"] / 2, expected["emb_grad"][sl], rtol=RTOL, atol=ATOL)


def _steps_on_global_batches(head, world_size, k):
    """Steps 2-3 of a world-size-2 run, computed on one process (the whole global batch)."""
    out = []
    for step in (2, 3):
        embeddings, labels, _ = _data(step, world_size, k)
        emb = embeddings.clone().requires_grad_()
        loss = head(emb, labels)
        loss.backward()
        out.append({"loss": loss.detach(), "emb_grad": emb.grad})
        head.weight.grad = None
    return out


# --- sub-centres ------------------------------------------------------------------------------

def test_subcentre_layout_is_class_major_and_only_the_arg_max_learns():
    k, dim, classes = 3, 4, 5
    head = PartialFC(get_margin("arcface", s=8.0, m=0.5), dim, classes, num_subcenters=k)
    assert tuple(head.weight.shape) == (classes * k, dim)
    embedding = torch.tensor([[0.3, -1.0, 2.0, 0.5]], requires_grad=True)
    with torch.no_grad():
        head.weight.normal_(generator=torch.Generator().manual_seed(0))
        head.weight[3 * k + 2] = embedding.detach()[0] + torch.tensor([0.0, 0.2, 0.0, 0.0])  # class 3, sub-centre 2
    loss = head(embedding, torch.tensor([3]))
    loss.backward()
    # the class's cosine is its best sub-centre's: class 3 (rows 9..11) is nearly aligned
    cos = torch.nn.functional.normalize(head.weight.detach()) @ torch.nn.functional.normalize(embedding.detach())[0]
    best = cos.view(classes, k).max(dim=1)
    assert int(best.indices[3]) == 2 and float(best.values[3]) > 0.99
    expected = get_margin("arcface", s=8.0, m=0.5)(best.values.unsqueeze(0).clone(), torch.tensor([3]))
    torch.testing.assert_close(loss.detach(), torch.nn.functional.cross_entropy(expected, torch.tensor([3])))
    # only each class's arg-max sub-centre gets a gradient
    grad = head.weight.grad.view(classes, k, dim).abs().sum(dim=2)
    for c in range(classes):
        for j in range(k):
            assert (grad[c, j] > 0) == (j == int(best.indices[c])), (c, j)


def test_sampling_keeps_all_subcentres_of_a_sampled_class():
    k = 4
    head = PartialFC(get_margin("cosface"), 8, 200, sample_rate=0.1, num_subcenters=k)
    torch.manual_seed(0)
    labels = torch.tensor([3, 150, 3, 77])
    head(torch.randn(4, 8), labels).backward()
    rows = head.weight.grad.coalesce().indices()[0]
    classes = torch.unique(rows // k)
    assert len(classes) == 20 and {3, 150, 77} <= set(classes.tolist())
    assert torch.equal(rows, (classes.unsqueeze(1) * k + torch.arange(k)).reshape(-1))


@pytest.mark.parametrize("bad", [0, -1, 256, 2.0, True])
def test_bad_number_of_subcentres(bad):
    with pytest.raises(ValueError, match="num_subcenters must be an integer in \\[1, 255\\]"):
        PartialFC(get_margin("arcface"), 8, 10, num_subcenters=bad)


# --- the registry and the config ----------------------------------------------------------------

def test_get_margin_defaults_are_the_papers():
    assert loss_parameters("adaface") == dict(s=64.0, m=0.4, h=0.333, t_alpha=0.01)
    assert loss_parameters("magface") == dict(s=64.0, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=35.0)
    assert loss_parameters("curricularface") == dict(s=64.0, m=0.5)
    assert get_margin("elasticface_arc").std == 0.05 and get_margin("elasticface_arc", plus=True).std == 0.0175
    assert get_margin("elasticface_cos").m == 0.35 and get_margin("elasticface_cos", plus=True).std == 0.02
    arc = get_margin("arcface")
    assert (arc.s, arc.m1, arc.m2, arc.m3) == (64.0, 1.0, 0.5, 0.0)
    assert get_margin("cosface").m3 == 0.4


@pytest.mark.parametrize("name, params, message", [
    ("adafcae", {}, "unknown loss 'adafcae'; valid losses: combined, arcface, cosface, adaface, magface"),
    ("adaface", {"hh": 1}, "loss 'adaface' has no parameter 'hh'; its parameters: s, m, h, t_alpha"),
    ("adaface", {"h": -0.1}, "h must be >= 0, got -0.1"),
    ("adaface", {"t_alpha": 0}, "t_alpha must be in (0, 1]"),
    ("magface", {"l_a": 110, "u_a": 10}, "0 < l_a < u_a, got l_a=110, u_a=10"),
    ("magface", {"u_m": 2.0}, "0 <= l_m <= u_m < pi/2"),
    ("curricularface", {"m": "big"}, "m of loss 'curricularface' must be a number, got 'big'"),
    ("elasticface_arc", {"plus": 1}, "plus of loss 'elasticface_arc' must be True or False"),
    ("elasticface_arc", {"std": -1.0}, "std must be >= 0"),
    ("arcface", {"s": 0}, "s (the logit scale) must be positive"),
])
def test_get_margin_refuses_bad_names_and_values(name, params, message):
    with pytest.raises(ValueError) as exc:
        get_margin(name, **params)
    assert message in str(exc.value)


def _config(*overrides):
    from utils.config import load_config

    return load_config("configs/ms1mv3_r50", list(overrides))


def test_build_margin_from_the_default_config_is_todays_combined_margin():
    from losses import CombinedMarginLoss, build_margin

    margin = build_margin(_config("--margin_list=(1.0,0.0,0.4)", "--margin_scale=32.0"))
    assert isinstance(margin, CombinedMarginLoss) and margin.name == "combined"
    assert (margin.s, margin.m1, margin.m2, margin.m3) == (32.0, 1.0, 0.0, 0.4)


def test_build_margin_from_the_command_line():
    from losses import build_margin

    cfg = _config("--loss=adaface", "--loss_params=dict(m=0.35,h=0.5)", "--margin_scale=48")
    margin = build_margin(cfg)
    assert (margin.name, margin.s, margin.m, margin.h, margin.t_alpha) == ("adaface", 48.0, 0.35, 0.5, 0.01)
    elastic = build_margin(_config("--loss=elasticface_cos", "--seed=77"))
    assert elastic.seed == 77 and torch.equal(elastic.generator.get_state(), torch.Generator().manual_seed(77).get_state())


@pytest.mark.parametrize("overrides, message", [
    (["--loss=adafcae"], "loss 'adafcae' is unknown; valid losses: combined, arcface"),
    (["--loss=adaface", "--loss_params=dict(hh=1)"],
     "loss_params: 'hh' is not a parameter of loss 'adaface'; valid: s, m, h, t_alpha"),
    (["--loss=adaface", "--loss_params=dict(h=-1)"],
     "loss 'adaface' with loss_params={'h': -1}, margin_scale=64.0: h must be >= 0, got -1"),
    (["--loss=magface", "--loss_params=dict(l_a=20,u_a=20)"], "l_a < u_a, got l_a=20, u_a=20"),
    (["--num_subcenters=0"], "num_subcenters must be an integer in [1, 255], got 0"),
    (["--loss=magface", "--interclass_filtering_threshold=0.3"],
     "interclass_filtering_threshold=0.3 works with loss combined, arcface or cosface only, not 'magface'"),
    (["--margin_list=(0.0,0.5,0.0)"],
     "margin_list=(0.0, 0.5, 0.0): m1 (multiplicative angular margin) must be positive"),
])
def test_build_margin_errors_name_the_key_the_value_and_the_choices(overrides, message):
    from losses import build_margin
    from utils.config import ConfigError

    with pytest.raises(ConfigError) as exc:
        build_margin(_config(*overrides))
    assert message in str(exc.value) and "\n" not in str(exc.value)


SHIPPED = {
    "ms1mv2_r100_adaface": ("adaface", 1),
    "ms1mv3_r50_adaface": ("adaface", 1),
    "ms1mv2_r100_magface": ("magface", 1),
    "ms1mv2_r100_curricularface": ("curricularface", 1),
    "ms1mv3_r50_subcenter": ("arcface", 3),
    "ms1mv2_r100_elasticface_arc_plus": ("elasticface_arc", 1),
}


@pytest.mark.parametrize("name", list(SHIPPED))
def test_shipped_loss_configs_build(name):
    from losses import build_margin
    from utils.config import load_config

    cfg = load_config(f"configs/{name}")
    loss, k = SHIPPED[name]
    assert build_margin(cfg).name == loss and cfg.num_subcenters == k


# --- CUDA (skipped without a GPU) ---------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("num_subcenters", [1, 3])
@pytest.mark.parametrize("key", list(MARGINS))
def test_cuda_matches_cpu_without_host_syncs(key, num_subcenters):
    results = {}
    for device in ("cpu", "cuda"):
        head = _head(key, num_subcenters, 1.0, 0, 1).float()
        head.check_labels = False  # the label check reads the device: the training loop turns it off on CUDA
        head.to(device)
        embeddings, labels, _ = _data(0, 2, num_subcenters)
        emb = embeddings.float().to(device).requires_grad_()
        labels = labels.to(device)
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("error")  # sample_rate = 1: no step waits for the device
        try:
            loss = head(emb, labels)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        results[device] = (loss.detach().cpu(), emb.grad.cpu(), head.weight.grad.cpu(), _margin_state(head))
    for a, b in zip(results["cpu"][:3], results["cuda"][:3]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    for name, value in results["cpu"][3].items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(results["cuda"][3][name].cpu(), value, rtol=1e-5, atol=1e-6)
