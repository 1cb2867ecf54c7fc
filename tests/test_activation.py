"""backbones.activation.PReLU: nn.PReLU's values and gradients from the faster CPU backward."""
import io
import threading

import onnx
import pytest
import torch
from torch import nn

from backbones.activation import PReLU, _PReLUFunction


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def _pair(channels, init=0.25):
    ours, stock = PReLU(channels, init=init), nn.PReLU(channels, init=init)
    with torch.no_grad():  # slopes of both signs and sizes, as trained networks have them
        values = torch.linspace(-0.7, 1.3, channels)
        ours.weight.copy_(values)
        stock.weight.copy_(values)
    return ours, stock


def _grads(module, x, grad_output):
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    y.backward(grad_output)
    return y, x.grad, module.weight.grad


@pytest.mark.parametrize("shape,memory_format", [
    ((4, 6, 5, 7), torch.channels_last), ((4, 6, 5, 7), torch.contiguous_format), ((9, 6), None), ((3, 6, 11), None),
])
def test_gradients_pass_gradcheck_in_float64(shape, memory_format):
    x = torch.randn(*shape, dtype=torch.float64)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    x.requires_grad_(True)
    weight = torch.linspace(-0.5, 0.9, shape[1], dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(_PReLUFunction.apply, (x, weight))


@pytest.mark.parametrize("shape,channels", [((3, 4, 5, 5), 4), ((3, 4), 1)])
def test_second_derivatives_pass_gradgradcheck(shape, channels):
    # backward(create_graph=True) must build a differentiable graph (the fast path is in place).
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    weight = torch.linspace(-0.5, 0.9, channels, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradgradcheck(_PReLUFunction.apply, (x, weight))


def test_gradients_already_returned_survive_later_backwards_through_other_shapes():
    # The backward reuses one buffer for its temporary: no gradient it hands out may live in it.
    layers = [_pair(channels) for channels in (8, 16, 8)]
    inputs = [torch.randn(2, 8, 9, 9), torch.randn(4, 16, 12, 12).contiguous(memory_format=torch.channels_last),
              torch.randn(3, 8, 5, 5)]
    kept = []
    for (ours, stock), x in zip(layers, inputs):
        g = torch.randn_like(x)
        _, gx_ours, gw_ours = _grads(ours, x, g)
        _, gx_stock, gw_stock = _grads(stock, x, g)
        kept.append((gx_ours, gw_ours, gx_ours.clone(), gw_ours.clone()))
        torch.testing.assert_close(gx_ours, gx_stock)
        torch.testing.assert_close(gw_ours, gw_stock)
    for gx, gw, gx_then, gw_then in kept:
        assert torch.equal(gx, gx_then) and torch.equal(gw, gw_then)


def test_backwards_on_two_threads_at_once_get_their_own_gradients():
    ours, stock = _pair(16)
    cases = [(torch.randn(8, 16, 20, 20), torch.randn(8, 16, 20, 20)) for _ in range(2)]
    expected = []
    for x, g in cases:
        stock.weight.grad = None
        expected.append(_grads(stock, x, g)[1:])
    barrier = threading.Barrier(2)
    results, errors = [None, None], []

    def run(index):
        try:
            x, g = cases[index]
            module = PReLU(16)
            module.load_state_dict(ours.state_dict())
            for _ in range(20):  # many rounds, so that the two threads' backwards overlap
                barrier.wait()
                module.weight.grad = None
                results[index] = _grads(module, x, g)[1:]
                torch.testing.assert_close(results[index][0], expected[index][0])
                torch.testing.assert_close(results[index][1], expected[index][1])
        except BaseException as error:  # reported on the main thread below
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


def test_one_shared_slope_gets_the_whole_sum():
    ours, stock = _pair(1)
    x = torch.randn(3, 4, 5, 5)
    g = torch.randn(3, 4, 5, 5)
    y_ours, gx_ours, gw_ours = _grads(ours, x, g)
    y_stock, gx_stock, gw_stock = _grads(stock, x, g)
    torch.testing.assert_close(y_ours, y_stock)
    torch.testing.assert_close(gx_ours, gx_stock)
    torch.testing.assert_close(gw_ours, gw_stock)


def test_float32_channels_last_equals_nn_prelu():
    ours, stock = _pair(16)
    x = torch.randn(8, 16, 14, 14).contiguous(memory_format=torch.channels_last)
    g = torch.randn(8, 16, 14, 14).contiguous(memory_format=torch.channels_last)
    y_ours, gx_ours, gw_ours = _grads(ours, x, g)
    y_stock, gx_stock, gw_stock = _grads(stock, x, g)
    assert "PReLUFunctionBackward" in y_ours.grad_fn.name()  # the CPU path was taken
    assert torch.equal(y_ours, y_stock)
    torch.testing.assert_close(gx_ours, gx_stock, rtol=0, atol=1e-6)
    torch.testing.assert_close(gw_ours, gw_stock, rtol=1e-5, atol=1e-4)
    assert gx_ours.dtype == torch.float32 and gw_ours.dtype == torch.float32


def test_under_bfloat16_autocast_it_keeps_autocasts_dtypes_and_nn_prelus_gradient():
    ours, stock = _pair(16)
    x = torch.randn(8, 16, 14, 14).contiguous(memory_format=torch.channels_last)
    g = torch.randn(8, 16, 14, 14, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ours, gx_ours, gw_ours = _grads(ours, x, g)
        y_stock, gx_stock, gw_stock = _grads(stock, x, g)
    assert y_ours.dtype == y_stock.dtype == torch.bfloat16
    assert torch.equal(y_ours, y_stock)
    assert gx_ours.dtype == torch.float32 and gw_ours.dtype == torch.float32  # the input's and the parameter's
    torch.testing.assert_close(gx_ours, gx_stock, rtol=1e-2, atol=1e-2)
    # The slope's gradient against the exact sum over the bfloat16 operands: the products are
    # rounded to bfloat16 (as ATen's are), the sum is float32.
    x_low = x.bfloat16().float()
    exact = ((g.float() * x_low) * (x_low <= 0)).sum((0, 2, 3))
    # Within 1% of the gradient's scale (a per-channel tolerance fails channels that cancel to ~0).
    scale = exact.abs().max().item()
    torch.testing.assert_close(gw_ours, exact, rtol=0, atol=1e-2 * scale)
    torch.testing.assert_close(gw_ours, gw_stock, rtol=0, atol=1e-2 * scale)


def _batch_innermost(t):  # dense, but dim 0 has stride 1: blocks of samples are not dense
    return t.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)


@pytest.mark.parametrize("layout", [
    lambda t: t.contiguous(memory_format=torch.channels_last), lambda t: t.contiguous(), _batch_innermost,
], ids=["channels_last", "contiguous", "batch_innermost"])
def test_a_large_bfloat16_slope_gradient_is_summed_in_float32(layout):
    # Above STAGING_ELEMENTS the bf16 products are summed block by block in a reused float32
    # buffer. Every element is on the negative side with x = -(1 + 2^-7) and a gradient of 1,
    # so each channel's exact sum is -(1 + 2^-7) * N*H*W: a float32 sum gets it to float32's
    # precision; a bf16 accumulator stops growing at 256, and even one bf16 rounding of a
    # channel's result moves it by up to 2^-9 of itself.
    from backbones.activation import STAGING_ELEMENTS

    batch, channels, height, width = 70, 3, 256, 256  # blocks of 21 samples, the last of 7
    assert batch * channels * height * width > 3 * STAGING_ELEMENTS
    module = PReLU(channels)
    x = torch.full((batch, channels, height, width), -1.0078125)
    x[:, 1] *= 2.0  # channels with different sums, to catch a mixed-up channel order
    x = layout(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(x)
    y.backward(torch.ones_like(y))
    exact = x.double().sum((0, 2, 3))
    assert module.weight.grad.dtype == torch.float32
    torch.testing.assert_close(module.weight.grad.double(), exact, rtol=1e-6, atol=0)


def test_a_large_bfloat16_gradient_matches_the_float32_sum_of_its_products():
    # Random signs and sizes, above the staging size: the same sum as sum(dtype=torch.float32).
    ours, stock = _pair(8)
    x = torch.randn(48, 8, 112, 112).contiguous(memory_format=torch.channels_last)
    g = torch.randn(48, 8, 112, 112, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, gx_ours, gw_ours = _grads(ours, x, g)
        _, gx_stock, _ = _grads(stock, x, g)
    x_low = x.bfloat16()
    products = (g * x_low) * (x_low <= 0)  # rounded to bf16, as the backward's are
    expected = products.sum((0, 2, 3), dtype=torch.float32)
    torch.testing.assert_close(gw_ours, expected, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(gx_ours, gx_stock)


def test_compiled_with_bfloat16_autocast_it_gives_the_eager_gradients(tmp_path, monkeypatch):
    # compile=True (train.py, the bench) runs this Function through dynamo and inductor.
    from utils.torch_compile import compile_module

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # a cold cache of its own
    torch._dynamo.reset()
    torch.manual_seed(3)
    eager = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), PReLU(8))
    with torch.no_grad():
        eager[1].weight.copy_(torch.linspace(-0.4, 0.6, 8))
    compiled_copy = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), PReLU(8))
    compiled_copy.load_state_dict(eager.state_dict())
    compiled = compile_module(compiled_copy)
    x = torch.randn(4, 3, 12, 12).contiguous(memory_format=torch.channels_last)
    grads = []
    for model, params in ((eager, eager), (compiled, compiled_copy)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().mean().backward()
        grads.append([p.grad for p in params.parameters()])
    torch._dynamo.reset()
    for ours, theirs in zip(*grads):
        assert ours.dtype == theirs.dtype == torch.float32
        torch.testing.assert_close(theirs, ours, rtol=2e-2, atol=1e-3)


def test_only_the_input_or_only_the_slope_may_need_a_gradient():
    ours, stock = _pair(6)
    x = torch.randn(2, 6, 3, 3)
    ours.weight.requires_grad_(False)
    stock.weight.requires_grad_(False)
    _, gx_ours, _ = _grads(ours, x, torch.ones(2, 6, 3, 3))
    _, gx_stock, _ = _grads(stock, x, torch.ones(2, 6, 3, 3))
    torch.testing.assert_close(gx_ours, gx_stock)
    ours.weight.requires_grad_(True)
    ours(x).sum().backward()  # x needs no gradient
    expected = (x * (x <= 0)).sum((0, 2, 3))
    torch.testing.assert_close(ours.weight.grad, expected)


def test_onnx_export_still_writes_a_prelu_node():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), PReLU(4)).eval()
    buffer = io.BytesIO()
    torch.onnx.export(model, (torch.randn(1, 3, 8, 8),), buffer, dynamo=False)
    ops = [node.op_type for node in onnx.load_from_string(buffer.getvalue()).graph.node]
    assert "PRelu" in ops and not any("Python" in op for op in ops)


def test_the_state_dict_is_nn_prelus():
    ours, stock = _pair(5)
    assert list(ours.state_dict()) == list(stock.state_dict()) == ["weight"]
    stock.load_state_dict(ours.state_dict())


# ---- two gloo ranks: DDP over the CPU backward -----------------------------------------------

def _prelu_stack(prelu=PReLU):
    """Two PReLUs of different widths around a convolution (no BatchNorm: its statistics are per
    rank), so that the backward's reused buffer serves two shapes in one step."""
    torch.manual_seed(5)
    stack = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), prelu(8),
                          nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), prelu(16), nn.Flatten())
    with torch.no_grad():
        for module in stack:
            if isinstance(module, nn.PReLU):
                module.weight.copy_(torch.linspace(-0.4, 0.6, module.num_parameters))
    return stack


def _prelu_global_batch(size=10):
    generator = torch.Generator().manual_seed(6)
    return torch.randn(8, 3, size, size, generator=generator).contiguous(memory_format=torch.channels_last)


def _prelu_step_on_rank(ctx, size=10, bf16=False):
    from utils.distributed import wrap_ddp

    model = wrap_ddp(_prelu_stack(), ctx)
    x = _prelu_global_batch(size)[ctx.rank * 4:(ctx.rank + 1) * 4]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(x)
    out.float().square().mean().backward()
    return {k.removeprefix("module."): p.grad for k, p in model.named_parameters()}


def test_two_gloo_ranks_give_the_global_batch_gradient_of_nn_prelu():
    from helpers import run_distributed

    results = run_distributed(_prelu_step_on_rank, 2)
    model = _prelu_stack(nn.PReLU)  # one process, the global batch, torch's own PReLU
    model(_prelu_global_batch()).square().mean().backward()
    for grads in results:  # DDP's average of the two halves' gradients is the global batch's
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_two_gloo_ranks_with_bf16_and_the_staged_sum_give_the_global_batch_gradient():
    # 384x384: the first PReLU's input on each rank (4x8x384x384) is above STAGING_ELEMENTS, so
    # its slope's gradient takes the staged float32 sum; the second's (4x16x192x192) does not.
    from backbones.activation import STAGING_ELEMENTS
    from helpers import run_distributed

    assert 4 * 8 * 384 * 384 > STAGING_ELEMENTS > 4 * 16 * 192 * 192
    results = run_distributed(_prelu_step_on_rank, 2, 384, True)
    model = _prelu_stack(nn.PReLU)  # one process, the global batch, torch's own PReLU in float32
    model(_prelu_global_batch(384)).square().mean().backward()
    for grads in results:
        for name, p in model.named_parameters():
            # bf16 activations: within 2% of the gradient's scale of the float32 one.
            scale = p.grad.abs().max().item()
            torch.testing.assert_close(grads[name], p.grad, rtol=0, atol=2e-2 * scale, msg=name)
