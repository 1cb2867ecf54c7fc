"""logits_chunk_rows: PartialFC's margin softmax a block of rows of the global batch at a time
(losses/chunked_logits.py). Every margin against its reference, one process and two gloo
ranks, is in tests/test_margins.py (its `-chunk3` cases); here: that no [N x k] matrix is
made, the low-precision matmul, the incoming gradient (GradScaler), the optimizers with
bfloat16 state, the memory model and the config key (a training run with it:
tests/test_train.py's single-process run)."""
from __future__ import annotations

import pytest
import torch

from bench.memory_model import EXACT_ALLOCATOR, measure, predicted
from losses import PartialFC, get_margin
from losses.optim import build_optimizer
from utils.config import ConfigError, load_config


def _head(chunk_rows, num_classes=400, sample_rate=0.5, matmul_dtype=None, loss="combined", dim=16, seed=0, **kw):
    torch.manual_seed(seed)
    return PartialFC(get_margin(loss), dim, num_classes, sample_rate, matmul_dtype=matmul_dtype,
                     logits_chunk_rows=chunk_rows, **kw)


def _batch(n=48, dim=16, num_classes=400, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g) * 8, torch.randint(0, num_classes, (n,), generator=g)


def _gradients(head, x, y, scale=1.0):
    torch.manual_seed(2)  # the same negatives for every head
    emb = x.clone().requires_grad_()
    loss = head(emb, y)
    (loss * scale).backward()
    grad = head.weight.grad
    return loss.detach(), emb.grad, grad.to_dense() if grad.is_sparse else grad


def test_no_matrix_of_the_global_batch_by_the_sampled_classes_is_made():
    n, num_classes, chunk = 128, 6000, 8
    x, y = _batch(n, num_classes=num_classes)
    k = int(0.5 * num_classes)

    def largest_allocation(chunk_rows):
        head = _head(chunk_rows, num_classes=num_classes)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            head(x.clone().requires_grad_(), y).backward()
        return max(e.cpu_memory_usage for e in prof.events())

    logits_bytes = n * k * 4
    assert largest_allocation(0) >= logits_bytes  # the unchunked head makes them: the test can see it
    # A block's [8 x k] matrices (1/16 of the logits) and the [k x 16] centre gradient (1/8).
    assert largest_allocation(chunk) <= logits_bytes // 6


@pytest.mark.parametrize("loss", ["combined", "curricularface", "magface"])
def test_low_precision_is_as_close_to_float32_as_the_unchunked_head(loss):
    x, y = _batch()
    exact = _gradients(_head(0, loss=loss), x, y)
    plain = _gradients(_head(0, loss=loss, matmul_dtype=torch.bfloat16), x, y)
    chunked = _gradients(_head(7, loss=loss, matmul_dtype=torch.bfloat16), x, y)
    for name, e, p, c in zip(("loss", "embeddings' gradient", "centres' gradient"), exact, plain, chunked):
        plain_error = float((p - e).norm() / e.norm())
        chunked_error = float((c - e).norm() / e.norm())
        assert chunked_error <= 1.5 * plain_error + 1e-6, (name, chunked_error, plain_error)


def test_the_kept_gradients_follow_the_incoming_gradient_once():
    x, y = _batch()
    one = _gradients(_head(5), x, y)
    scaled = _gradients(_head(5), x, y, scale=1024.0)  # GradScaler's scaled loss
    torch.testing.assert_close(scaled[1], one[1] * 1024.0)
    torch.testing.assert_close(scaled[2], one[2] * 1024.0)

    head = _head(5)
    loss = head(x.clone().requires_grad_(), y)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once per forward"):
        loss.backward()


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("fc_state_dtype", ["float32", "bfloat16"])
def test_training_with_chunks_follows_the_unchunked_head(optimizer, fc_state_dtype):
    def train(chunk_rows):
        head = _head(chunk_rows, loss="curricularface")
        backbone = torch.nn.Linear(8, 16)
        opt = build_optimizer(optimizer, backbone.parameters(), head.parameters(), lr=0.1 if optimizer == "sgd" else 1e-3,
                              weight_decay=5e-4, fc_state_dtype=fc_state_dtype)
        g = torch.Generator().manual_seed(3)
        for _ in range(4):
            x, y = torch.randn(32, 8, generator=g), torch.randint(0, 400, (32,), generator=g)
            head(backbone(x), y).backward()
            opt.step()
            opt.zero_grad()
        return head.weight.detach(), backbone.weight.detach(), head.margin_loss.t.clone()

    plain, chunked = train(0), train(6)
    # Stochastic rounding turns float32's last-bit differences into bfloat16 steps now and then.
    tolerance = 1e-5 if fc_state_dtype == "float32" else 2e-3
    for a, b in zip(plain, chunked):
        torch.testing.assert_close(b, a, rtol=tolerance, atol=tolerance)


def test_a_chunk_at_least_the_batch_is_the_unchunked_head():
    x, y = _batch(n=12)
    for a, b in zip(_gradients(_head(0), x, y), _gradients(_head(12), x, y)):
        assert torch.equal(a, b)


def test_the_memory_model_predicts_the_measured_peak():
    """bench/memory_model.py's chunked phases against the resident-set peak of a step (each in
    a fresh process, glibc returning freed blocks: EXACT_ALLOCATOR), as its --validate does.
    A float32 matmul: bfloat16 is emulated, and minutes slower, on an AVX2-only CPU."""
    case = dict(impl="ours", num_local=40_000, sample_rate=0.3, global_batch=2048, embedding_size=512,
                matmul_bytes=4, optimizer="sgd", fc_state_dtype="bfloat16", device="cpu", steps=2,
                logits_chunk_rows=128)
    model, phase = predicted(case)
    assert phase == "block"
    tiny = dict(case, num_local=2000)
    process = measure(tiny, EXACT_ALLOCATOR) - predicted(tiny)[0]
    measured = measure(case, EXACT_ALLOCATOR)
    assert abs((model + process) / measured - 1) < 0.08, (model + process, measured)
    unchunked = predicted(dict(case, logits_chunk_rows=0))[0]
    assert measured < 0.8 * (unchunked + process)  # what chunking buys here (0.71x when written)


def test_bad_chunk_rows_are_refused():
    for bad in (-1, 2.5, True, "256"):
        with pytest.raises(ValueError, match="logits_chunk_rows"):
            _head(bad)
    assert load_config("configs/base.py").logits_chunk_rows == 0
    assert load_config("configs/base.py", ["--logits_chunk_rows=256"]).logits_chunk_rows == 256
    for override in ("--logits_chunk_rows=-4", "--logits_chunk_rows=1.5", "--logits_chunk_rows=True"):
        with pytest.raises(ConfigError) as info:
            load_config("configs/base.py", [override])
        assert "logits_chunk_rows" in str(info.value) and "\n" not in str(info.value)


def test_float16_block_gradients_keep_the_small_probabilities_of_a_large_batch():
    """A block's gradient in float16 is of a row's own size, 1/N comes after in float32: at
    N = 262,144 the unchunked head's float16 gradient (without GradScaler, 1/N inside) loses
    the small softmax terms below float16's range, the chunked one does not."""
    n, num_classes = 262_144, 200
    x, y = _batch(n=n, num_classes=num_classes)
    exact = _gradients(_head(0, num_classes=num_classes), x, y)[2]

    def error(chunk_rows):
        grad = _gradients(_head(chunk_rows, num_classes=num_classes, matmul_dtype=torch.float16), x, y)[2]
        return float((grad - exact).norm() / exact.norm())

    assert error(8192) < 0.9 * error(0)
