"""fc_state_dtype="bfloat16": the class centres' optimizer state kept in bfloat16 with
stochastic rounding -- unbiased, reproducible, saved and resumed, close to float32 state."""
import copy
import io
import math

import pytest
import torch

import losses.optim as optim_module
import losses.row_chunks
from losses import CombinedMarginLoss, PartialFC
from losses.optim import SampledRowAdamW, SampledRowSGD, _StochasticRounding, build_optimizer
from losses.reshard import merge, split
from utils.config import ConfigError, load_config

MARGINS = {"arcface": (1.0, 0.5, 0.0), "cosface": (1.0, 0.0, 0.4), "combined": (1.0, 0.3, 0.2)}


def _bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bfloat16 values either side of x (towards zero, away from zero), as float32."""
    bits = x.view(torch.int32)
    down = (bits & -65536).view(torch.float32)
    up = ((bits & -65536) + 65536).view(torch.float32)
    return down, up


def _round_many(x: torch.Tensor, times: int, seed: int = 0) -> torch.Tensor:
    """`times` stochastic roundings of x, each at its own optimizer step: [times, *x.shape]."""
    rounding = _StochasticRounding()
    group = {"rounding_seed": seed, "rounding_step": 0}
    out = []
    for step in range(times):
        group["rounding_step"] = step
        out.append(rounding.round_(group, x.clone()).float())
    return torch.stack(out)


def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([
        torch.randn(200, generator=g),
        -torch.rand(50, generator=g) * 1e-3,
        torch.tensor([1.0 + 2**-9, 2.0 - 2**-12, -3.0 - 2**-8, 1e-40, 7.0 + 3 * 2**-8 / 4]),  # subnormal, near 2
    ])
    rounded = _round_many(x, 3000)
    down, up = _bf16_neighbours(x)
    assert bool(((rounded == down) | (rounded == up)).all()), "a stochastic rounding left the two neighbours"
    ulp = (up - down).abs()
    # Each rounding is a Bernoulli choice between the neighbours; the mean of 3000 is within
    # ulp * 0.5 / sqrt(3000) ~ 0.009 ulp of x (one standard deviation); allow 6.
    error = ((rounded.double().mean(0) - x.double()) / ulp.double()).abs()
    assert float(error.max()) < 6 * 0.5 / math.sqrt(3000), float(error.max())
    # Round-to-nearest is off by the distance to the nearest neighbour, on every draw.
    nearest_error = ((x.bfloat16().double() - x.double()) / ulp.double()).abs()
    assert float(nearest_error.mean()) > 0.2 > float(error.mean()) * 10


def test_exact_values_zero_and_infinity_stay_as_they_are():
    x = torch.tensor([0.0, -0.0, 1.0, -2.5, 3.0e38, float("inf"), float("-inf")]).bfloat16().float()
    rounded = _round_many(x, 50)
    assert torch.equal(rounded, x.expand(50, -1))
    assert bool(torch.signbit(rounded[:, 1]).all())


def test_one_rounding_of_many_copies_is_exact_on_average():
    # Within one piece the bits come from consecutive table entries, every 16-bit value equally
    # often: the mean over a whole table's worth of copies is exact, not just close.
    x = torch.full((optim_module.ROUNDING_TABLE_SIZE,), 1.0 + 0.3 * 2**-7)
    rounded = _StochasticRounding().round_({"rounding_seed": 3, "rounding_step": 1}, x.clone()).double()
    down, up = _bf16_neighbours(x[:1])
    fraction = (x[0].double() - down.double()) / (up - down).double()
    assert float(((rounded == up.double()).double().mean() - fraction).abs()) < 1 / 65536 + 1e-12


def test_pieces_longer_than_the_table_stay_unbiased(monkeypatch):
    monkeypatch.setattr(optim_module, "ROUNDING_TABLE_SIZE", 1 << 16)
    x = torch.full((3, 50_000), -5.0 - 0.7 * 2**-5)  # 150,000 elements: the table read 2.3 times
    rounded = _round_many(x, 40).double()
    assert abs(float(rounded.mean()) - float(x[0, 0])) < 0.01 * 2**-5


def test_round_to_nearest_loses_small_updates_that_stochastic_rounding_keeps():
    # Momentum 1, no decay: buf accumulates 1e-4 per step on top of 1.0, which is less than half
    # of bfloat16's step at 1.0 (2^-8).
    rows, dim, steps = 128, 256, 300
    p = torch.nn.Parameter(torch.zeros(rows, dim))
    opt = build_optimizer("sgd", [], [p], lr=0.0, momentum=1.0, weight_decay=0.0, fc_state_dtype="bfloat16")
    p.grad = torch.ones(rows, dim)
    opt.step()
    nearest = torch.ones(rows, dim).bfloat16()
    for _ in range(steps):
        p.grad = torch.full((rows, dim), 1e-4)
        opt.step()
        nearest = (nearest.float() + 1e-4).bfloat16()
    buf = opt.state[p]["momentum_buffer"]
    assert buf.dtype == torch.bfloat16
    assert torch.equal(nearest.float(), torch.ones(rows, dim)), "round-to-nearest was expected to lose them"
    exact = 1.0 + steps * 1e-4
    # Each element's value is a random walk of its rounding errors (about 0.055 after 300 steps);
    # their mean over 32,768 elements is within 0.0003 of the exact sum (one standard deviation).
    assert abs(float(buf.float().mean()) - exact) < 0.002, float(buf.float().mean())


def test_adamw_second_moment_decays_in_bfloat16():
    # v *= 0.999 is below bfloat16's resolution: to nearest it would never decay.
    p = torch.nn.Parameter(torch.zeros(64, 64))
    opt = build_optimizer("adamw", [], [p], lr=1e-3, weight_decay=0.0, fc_state_dtype="bfloat16")
    p.grad = torch.ones(64, 64)
    opt.step()
    for _ in range(300):
        p.grad = torch.zeros(64, 64)
        opt.step()
    v = opt.state[p]["exp_avg_sq"]
    assert v.dtype == torch.bfloat16
    expected = 1e-3 * 0.999**300
    assert abs(float(v.float().mean()) / expected - 1) < 0.01


def _train_head(optimizer: str, fc_state_dtype: str, margin=(1.0, 0.5, 0.0), sample_rate=0.2, steps=15, seed=0):
    torch.manual_seed(0)
    head = PartialFC(CombinedMarginLoss(64.0, *margin), 32, 1000, sample_rate)
    lr = 0.1 if optimizer == "sgd" else 1e-3
    opt = build_optimizer(optimizer, [], head.parameters(), lr=lr, weight_decay=5e-4, fc_state_dtype=fc_state_dtype,
                          seed=seed)
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(1000, 32, generator=g)
    losses = []
    for _ in range(steps):
        labels = torch.randint(0, 1000, (64,), generator=g)
        embeddings = centres[labels] + 0.5 * torch.randn(64, 32, generator=g)
        loss = head(embeddings, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return head, opt, losses


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("sample_rate", [0.2, 1.0])
def test_bfloat16_state_tracks_float32_state(optimizer, sample_rate):
    w0 = _train_head(optimizer, "float32", steps=0)[0].weight.detach().clone()
    ref, ref_opt, ref_losses = _train_head(optimizer, "float32", sample_rate=sample_rate)
    ours, opt, our_losses = _train_head(optimizer, "bfloat16", sample_rate=sample_rate)
    for key in ("momentum_buffer",) if optimizer == "sgd" else ("exp_avg", "exp_avg_sq"):
        assert opt.state[ours.weight][key].dtype == torch.bfloat16
        assert ref_opt.state[ref.weight][key].dtype == torch.float32
    moved = (ref.weight.detach() - w0).norm()
    assert float((ours.weight.detach() - ref.weight.detach()).norm() / moved) < 0.02
    assert ref_losses[-1] < ref_losses[0] - 1  # the head learns: the comparison is not of two idle runs
    assert max(abs(a - b) / a for a, b in zip(our_losses, ref_losses)) < 0.01


@pytest.mark.parametrize("margin", list(MARGINS))
def test_every_margin_trains_with_bfloat16_state(margin):
    ref, _, ref_losses = _train_head("sgd", "float32", MARGINS[margin], steps=8)
    ours, _, our_losses = _train_head("sgd", "bfloat16", MARGINS[margin], steps=8)
    assert our_losses[-1] < our_losses[0]
    assert max(abs(a - b) / a for a, b in zip(our_losses, ref_losses)) < 0.01


def _sparse_step(p, opt, step):
    g = torch.Generator().manual_seed(100 + step)
    rows = torch.randperm(p.shape[0], generator=g)[: p.shape[0] // 4].sort().values
    p.grad = torch.sparse_coo_tensor(rows[None], torch.randn(rows.numel(), p.shape[1], generator=g), p.shape,
                                     check_invariants=True)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _fresh(optimizer, seed=0, fc_state_dtype="bfloat16"):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(40, 16))
    lr = 0.1 if optimizer == "sgd" else 1e-2
    return p, build_optimizer(optimizer, [], [p], lr=lr, weight_decay=5e-4, fc_state_dtype=fc_state_dtype, seed=seed)


def _saved(opt) -> dict:
    buffer = io.BytesIO()  # as a checkpoint on disk would
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_state_dict_carries_bfloat16_state_and_resume_equals_uninterrupted(optimizer):
    keys = ("momentum_buffer",) if optimizer == "sgd" else ("exp_avg", "exp_avg_sq")
    straight, straight_opt = _fresh(optimizer)
    for step in range(6):
        _sparse_step(straight, straight_opt, step)

    first, first_opt = _fresh(optimizer)
    for step in range(3):
        _sparse_step(first, first_opt, step)
    saved = _saved(first_opt)
    for key in keys:
        assert saved["state"][0][key].dtype == torch.bfloat16
    # The resumed run is built with another seed in its config: the checkpoint's decides.
    resumed, resumed_opt = _fresh(optimizer, seed=99)
    with torch.no_grad():
        resumed.copy_(first)
    resumed_opt.load_state_dict(saved)
    for key in keys:
        assert resumed_opt.state[resumed][key].dtype == torch.bfloat16  # torch would have cast it to float32
    for step in range(3, 6):
        _sparse_step(resumed, resumed_opt, step)
    assert torch.equal(resumed.detach(), straight.detach())
    for key in keys:
        assert torch.equal(resumed_opt.state[resumed][key], straight_opt.state[straight][key])

    # The random bits matter: another seed from the start rounds differently.
    other, other_opt = _fresh(optimizer, seed=99)
    for step in range(6):
        _sparse_step(other, other_opt, step)
    assert not torch.equal(other_opt.state[other][keys[0]], straight_opt.state[straight][keys[0]])


@pytest.mark.parametrize("saved_dtype, resumed_dtype", [("float32", "bfloat16"), ("bfloat16", "float32")])
def test_a_run_may_change_fc_state_dtype_at_resume(saved_dtype, resumed_dtype):
    p, opt = _fresh("sgd", fc_state_dtype=saved_dtype)
    _sparse_step(p, opt, 0)
    saved = _saved(opt)
    q, resumed = _fresh("sgd", fc_state_dtype=resumed_dtype)
    resumed.load_state_dict(saved)
    buf = resumed.state[q]["momentum_buffer"]
    assert buf.dtype == optim_module.STATE_DTYPES[resumed_dtype]
    torch.testing.assert_close(buf.float(), opt.state[p]["momentum_buffer"].float(), rtol=2**-8, atol=0)
    _sparse_step(q, resumed, 1)
    assert resumed.state[q]["momentum_buffer"].dtype == buf.dtype


def test_resharded_bfloat16_state_keeps_its_dtype_and_rows():
    torch.manual_seed(0)
    backbone = torch.nn.Linear(3, 8)
    head = PartialFC(CombinedMarginLoss(64, 1.0, 0.5, 0.0), 8, 11, 0.5)
    opt = build_optimizer("adamw", backbone.parameters(), head.parameters(), lr=1e-2, weight_decay=0.01,
                          fc_state_dtype="bfloat16")
    loss = head(backbone(torch.randn(6, 3)), torch.randint(0, 11, (6,)))
    loss.backward()
    opt.step()
    state = copy.deepcopy({
        "world_size": 1, "rank": 0, "state_dict_backbone": backbone.state_dict(),
        "state_dict_softmax_fc": head.state_dict(), "state_optimizer": opt.state_dict(),
        "partial_fc": {"class_start": 0, "num_local": 11, "num_classes": 11, "embedding_size": 8},
    })
    index = len(list(backbone.parameters()))
    parts = split(state, 3)
    for part in parts:
        head_state = part["state_optimizer"]["state"][index]
        assert head_state["exp_avg"].dtype == head_state["exp_avg_sq"].dtype == torch.bfloat16
        assert part["state_optimizer"]["param_groups"][1]["state_dtype"] == "bfloat16"
    merged = merge(parts)["state_optimizer"]["state"][index]
    for key in ("exp_avg", "exp_avg_sq", "row_step"):
        assert torch.equal(merged[key], state["state_optimizer"]["state"][index][key])
    # A rank of the new world size continues from its rows, still in bfloat16.
    shard = PartialFC(CombinedMarginLoss(64, 1.0, 0.5, 0.0), 8, 11, 0.5, rank=1, world_size=3)
    shard.load_state_dict(parts[1]["state_dict_softmax_fc"])
    shard_opt = build_optimizer("adamw", torch.nn.Linear(3, 8).parameters(), shard.parameters(), lr=1e-2,
                                weight_decay=0.01, fc_state_dtype="bfloat16")
    shard_opt.load_state_dict(parts[1]["state_optimizer"])
    assert shard_opt.state[shard.weight]["exp_avg"].dtype == torch.bfloat16
    shard.weight.grad = torch.sparse_coo_tensor(torch.tensor([[0, 2]]), torch.randn(2, 8), shard.weight.shape,
                                                check_invariants=True)
    shard_opt.step()
    assert shard_opt.state[shard.weight]["exp_avg"].dtype == torch.bfloat16


@pytest.mark.parametrize("cls", [SampledRowSGD, SampledRowAdamW])
def test_a_void_step_leaves_bfloat16_state_unchanged(cls):
    p = torch.nn.Parameter(torch.randn(10, 3))
    kw = dict(momentum=0.9) if cls is SampledRowSGD else {}
    opt = cls([{"params": [p], "state_dtype": "bfloat16"}], lr=0.1, weight_decay=0.01, fused=True, **kw)
    p.grad = torch.sparse_coo_tensor(torch.tensor([[2, 5]]), torch.randn(2, 3), p.shape)
    opt.step()
    before = p.detach().clone()
    state = {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v) and k != "step"}
    with torch.no_grad():  # as on an accelerator, where step() leaves the decision on the device
        opt._row_update(opt.param_groups[0], p, torch.tensor([2, 5, 8]), torch.randn(3, 3), skip=torch.tensor(True))
    assert torch.equal(p.detach(), before)
    assert all(torch.equal(opt.state[p][k], v) for k, v in state.items())


def test_grad_scaler_unscales_the_rows_before_rounding():
    results = []
    for scale in (None, 2.0**12):
        p, opt = _fresh("sgd")
        g = torch.randn(10, 16)
        p.grad = torch.sparse_coo_tensor(torch.arange(10)[None], g if scale is None else g * scale, p.shape)
        if scale is None:
            opt.step()
        else:
            scaler = torch.amp.GradScaler("cpu", init_scale=scale)
            scaler.scale(torch.tensor(1.0))
            scaler.step(opt)
        results.append((p.detach().clone(), opt.state[p]["momentum_buffer"].clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_the_step_allocates_nothing_of_the_shards_size(optimizer, monkeypatch):
    # Pieces of 64 rows: the update's temporaries are bounded by a piece, not by the sample.
    monkeypatch.setattr(losses.row_chunks, "CPU_CHUNK_BYTES", 64 * 64 * 4)
    monkeypatch.setattr(losses.row_chunks, "LEAN_CPU_CHUNK_BYTES", 64 * 64 * 4)  # bfloat16 state: lean pieces
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(20_000, 64))
    opt = build_optimizer(optimizer, [], [p], lr=0.1, weight_decay=5e-4, fc_state_dtype="bfloat16")
    _sparse_step(p, opt, 0)  # creates the state and the rounding table
    p.grad = torch.sparse_coo_tensor(torch.arange(0, 20_000, 10)[None], torch.randn(2000, 64), p.shape)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    largest = max(e.cpu_memory_usage for e in prof.events())
    shard_bytes = p.numel() * 4
    piece_bytes = 64 * 64 * 4
    assert 0 < largest <= 2 * piece_bytes < shard_bytes // 100, largest


def test_unknown_fc_state_dtype_is_refused():
    with pytest.raises(ValueError, match="fc_state_dtype"):
        build_optimizer("sgd", [], [torch.nn.Parameter(torch.zeros(2, 2))], lr=0.1, weight_decay=0.0,
                        fc_state_dtype="float16")
    p = torch.nn.Parameter(torch.zeros(4, 2, dtype=torch.float64))
    opt = build_optimizer("sgd", [], [p], lr=0.1, weight_decay=0.0, fc_state_dtype="bfloat16")
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="float32 parameters"):
        opt.step()


def test_config_keys():
    cfg = load_config("configs/base.py")
    assert cfg.fc_state_dtype == "float32" and cfg.cudnn_benchmark is True
    assert load_config("configs/base.py", ["--fc_state_dtype=bfloat16"]).fc_state_dtype == "bfloat16"
    for override, names in (("--fc_state_dtype=float16", "fc_state_dtype"), ("--fc_state_dtype=3", "fc_state_dtype"),
                            ("--cudnn_benchmark=3", "cudnn_benchmark")):
        with pytest.raises(ConfigError) as info:
            load_config("configs/base.py", [override])
        message = str(info.value)
        assert names in message and "\n" not in message, message


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("fc_state_dtype", ["float32", "bfloat16"])
def test_the_memory_model_counts_the_state_the_optimizer_keeps(optimizer, fc_state_dtype):
    from bench.memory_model import persistent_bytes_per_class

    p, opt = _fresh(optimizer, fc_state_dtype=fc_state_dtype)
    _sparse_step(p, opt, 0)
    per_row = [t for t in opt.state[p].values() if torch.is_tensor(t) and t.dim() >= 1]
    held = p.numel() * p.element_size() + sum(t.numel() * t.element_size() for t in per_row)
    assert held == p.shape[0] * persistent_bytes_per_class(optimizer, fc_state_dtype, p.shape[1], sampling=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rounds_like_the_cpu_and_skips_on_the_device():
    torch.manual_seed(0)
    w0 = torch.randn(5000, 64)
    steps = []
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        rows = torch.randperm(5000, generator=g)[:700].sort().values
        steps.append((rows, torch.randn(700, 64, generator=g)))
    results = {}
    for device in ("cpu", "cuda"):
        p = torch.nn.Parameter(w0.clone().to(device))
        opt = build_optimizer("sgd", [], [p], lr=0.1, weight_decay=5e-4, device_type=device, fc_state_dtype="bfloat16")
        for rows, values in steps:
            p.grad = torch.sparse_coo_tensor(rows[None], values, p.shape, check_invariants=True).to(device)
            opt.step()
        results[device] = (p.detach().cpu(), opt.state[p]["momentum_buffer"].float().cpu())
        if device == "cuda":  # a void step decided on the device (no host read) changes nothing
            before = [t.clone() for t in results[device]]
            p.grad = torch.sparse_coo_tensor(steps[0][0][None], steps[0][1], p.shape).to(device)
            opt.found_inf = torch.ones((), device=device)
            opt.step()
            del opt.found_inf
            assert torch.equal(p.detach().cpu(), before[0])
            assert torch.equal(opt.state[p]["momentum_buffer"].float().cpu(), before[1])
    torch.testing.assert_close(results["cuda"][0], results["cpu"][0], rtol=1e-5, atol=1e-6)
    # The same random bits on both: only values within float32 noise of a rounding threshold differ.
    differ = results["cuda"][1] != results["cpu"][1]
    assert float(differ.float().mean()) < 1e-3
