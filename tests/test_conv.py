"""backbones.conv.Conv2d: nn.Conv2d's values and gradients through its two CPU routes."""
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from backbones import get_model
from backbones.conv import Conv2d, _StridedDepthwiseConv, block_diagonal_weight, depthwise_input_gradient, merge_factor
from eval.onnx_export import export_onnx


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


class _Conv2dCalls(TorchFunctionMode):
    """Records the `groups` of every F.conv2d call and every depthwise route taken."""

    def __init__(self):
        super().__init__()
        self.groups = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d:
            self.groups.append(args[6] if len(args) > 6 else kwargs.get("groups", 1))
        return func(*args, **kwargs)


def _pair(in_channels, out_channels, kernel, stride=1, padding=0, groups=1, bias=False):
    ours = Conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding, groups=groups, bias=bias)
    stock = nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding, groups=groups, bias=bias)
    stock.load_state_dict(ours.state_dict())
    return ours, stock


def _run(module, x, grad_output, autocast=False):
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = module(x)
    y.backward(grad_output.to(y.dtype))
    grads = [x.grad] + [p.grad for p in module.parameters()]
    for p in module.parameters():
        p.grad = None
    return [y.float()] + [g.float() for g in grads]


def _relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("in_channels,groups,dtype,expected", [
    (128, 64, torch.bfloat16, 8),  # mbf's conv2_dw: 2 channels per group -> 16
    (128, 64, torch.float32, 4),   # -> 8
    (12, 4, torch.float32, 2),     # 3 per group: 8 // 3 = 2 groups, and 2 divides 4
    (20, 5, torch.bfloat16, 1),    # 4 per group wants 4 merged, 5 groups allow none
    (128, 128, torch.bfloat16, 1),  # depthwise: left alone
    (64, 1, torch.bfloat16, 1),
    (128, 64, torch.float64, 1),   # no measured benefit: left alone
])
def test_merge_factor(in_channels, groups, dtype, expected):
    assert merge_factor(in_channels, groups, dtype) == expected


@pytest.mark.parametrize("in_channels,out_channels,groups,merge", [(8, 8, 4, 2), (12, 6, 6, 3), (16, 32, 8, 4)])
def test_block_diagonal_weight_is_the_same_convolution(in_channels, out_channels, groups, merge):
    weight = torch.randn(out_channels, in_channels // groups, 3, 3, dtype=torch.float64)
    x = torch.randn(2, in_channels, 9, 9, dtype=torch.float64)
    merged = block_diagonal_weight(weight, groups, merge)
    assert merged.shape == (out_channels, merge * in_channels // groups, 3, 3)
    torch.testing.assert_close(F.conv2d(x, merged, padding=1, groups=groups // merge),
                               F.conv2d(x, weight, padding=1, groups=groups))


@pytest.mark.parametrize("size,kernel,stride,padding", [
    (14, 3, 2, 1), (15, 3, 2, 1), (13, 5, 2, 2), (16, 3, 3, 1), (11, 3, 2, 0), (7, 7, 1, 0), (12, 4, 2, 1),
])
def test_depthwise_input_gradient_equals_atens(size, kernel, stride, padding):
    channels = 5
    x = torch.randn(3, channels, size, size + 1, dtype=torch.float64)
    weight = torch.randn(channels, 1, kernel, kernel, dtype=torch.float64)
    out = F.conv2d(x, weight, stride=stride, padding=padding, groups=channels)
    grad_output = torch.randn_like(out)
    expected = torch.ops.aten.convolution_backward(
        grad_output, x, weight, None, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], channels,
        [True, False, False])[0]
    got = depthwise_input_gradient(grad_output, weight, x.shape, (stride, stride), (padding, padding))
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_strided_depthwise_function_passes_gradcheck(memory_format):
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64).contiguous(memory_format=memory_format).requires_grad_(True)
    weight = torch.randn(3, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _StridedDepthwiseConv.apply(a, b, (2, 2), (1, 1)), (x, weight))


@pytest.mark.parametrize("case", ["grouped", "strided_depthwise", "depthwise", "dense"])
def test_bf16_autocast_matches_float32_as_closely_as_nn_conv2d(case):
    """Under bf16 autocast the routed convolution is as close to the exact (fp32) values as ATen's."""
    in_channels, out_channels, stride, groups = {
        "grouped": (32, 32, 1, 16), "strided_depthwise": (32, 32, 2, 32),
        "depthwise": (32, 32, 1, 32), "dense": (16, 32, 2, 1)}[case]
    ours, stock = _pair(in_channels, out_channels, 3, stride=stride, padding=1, groups=groups)
    x = torch.randn(4, in_channels, 16, 16).contiguous(memory_format=torch.channels_last)
    grad_output = torch.randn(4, out_channels, 16 // stride, 16 // stride).contiguous(memory_format=torch.channels_last)
    exact = _run(stock, x, grad_output)
    routed = _run(ours, x, grad_output, autocast=True)
    aten_bf16 = _run(stock, x, grad_output, autocast=True)
    for got, reference, want in zip(routed, aten_bf16, exact):
        assert _relative_error(got, want) < max(2 * _relative_error(reference, want), 1e-2)


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_float32_grouped_route_equals_nn_conv2d(memory_format):
    ours, stock = _pair(32, 64, 3, padding=1, groups=16, bias=True)
    x = torch.randn(3, 32, 12, 12).contiguous(memory_format=memory_format)
    grad_output = torch.randn(3, 64, 12, 12)
    for got, want in zip(_run(ours, x, grad_output), _run(stock, x, grad_output)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_routes_are_taken_on_cpu_and_not_in_export(tmp_path):
    grouped, _ = _pair(32, 32, 3, padding=1, groups=16)
    strided, _ = _pair(32, 32, 3, stride=2, padding=1, groups=32)
    x = torch.randn(2, 32, 8, 8, requires_grad=True)
    with _Conv2dCalls() as calls, torch.autocast("cpu", dtype=torch.bfloat16):
        grouped(x)
        y = strided(x)
    assert calls.groups == [2, 32]  # 16 groups of 2 merged into 2 of 16; the depthwise one kept
    assert type(y.grad_fn).__name__ == "_StridedDepthwiseConvBackward"
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert strided(x).grad_fn is None  # inference needs no input gradient: ATen's forward

    path = export_onnx(get_model("mbf", num_features=64), tmp_path / "mbf.onnx")
    groups = [next(a.i for a in node.attribute if a.name == "group")
              for node in onnx.load(str(path)).graph.node if node.op_type == "Conv"]
    assert groups[:2] == [1, 64]  # conv1, then conv2_dw: the module's own convolution, 64 groups of 2


@pytest.mark.parametrize("name", ["mbf", "mbf_small"])  # mbf_small's conv2_dw is depthwise (64 groups of 1)
def test_mobilefacenet_step_under_bf16_matches_float32(name):
    """The whole mbf trunk (grouped conv2_dw, strided depthwise stages) through the routes."""
    model = get_model(name, num_features=64).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 112, 112).contiguous(memory_format=torch.channels_last)

    def step(autocast):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(x).float().square().mean()
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])

    loss32, grads32 = step(False)
    loss16, grads16 = step(True)
    assert abs(loss16 - loss32) / loss32 < 0.02
    assert _relative_error(grads16, grads32) < 0.05


# ---- two gloo ranks: DDP over the routed convolutions -----------------------------------------

def _routed_stack():
    """The two routed kinds in a row, without BatchNorm (whose statistics are per rank)."""
    torch.manual_seed(3)
    return nn.Sequential(Conv2d(8, 8, 3, padding=1, groups=4, bias=False), nn.ReLU(),
                         Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False), nn.Flatten())


def _global_batch():
    generator = torch.Generator().manual_seed(4)
    return torch.randn(8, 8, 12, 12, generator=generator).contiguous(memory_format=torch.channels_last)


def _routed_step_on_rank(ctx):
    from utils.distributed import wrap_ddp

    model = wrap_ddp(_routed_stack(), ctx)
    x = _global_batch()[ctx.rank * 4:(ctx.rank + 1) * 4]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().square().mean().backward()
    return {k.removeprefix("module."): p.grad for k, p in model.named_parameters()}


def test_two_gloo_ranks_through_the_routes_give_the_global_batch_gradient():
    from helpers import run_distributed

    results = run_distributed(_routed_step_on_rank, 2)
    model = _routed_stack()  # one process, the global batch, torch's own convolutions in fp32
    for m in model:
        if isinstance(m, Conv2d):
            m.__class__ = nn.Conv2d
    model(_global_batch()).square().mean().backward()
    for grads in results:  # DDP's average of the two halves' bf16 gradients is the global batch's
        for name, p in model.named_parameters():
            assert _relative_error(grads[name].float(), p.grad.float()) < 2e-2, name
