"""backbones.folding.fold_batchnorm: the same embeddings with BatchNorm folded into the convolutions."""
import pytest
import torch
from torch import nn

from backbones import get_model
from backbones.folding import fold_batchnorm


def _with_trained_statistics(model):
    """Running statistics and affine parameters far from their initial values, as after training."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=generator) * 2 + 0.1)
                m.weight.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
    return model


def _count(model, kind):
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.mark.parametrize("network,folded_away", [("mbf", "all"), ("r18", 4)])
def test_folded_model_embeds_like_the_model_in_eval_mode(network, folded_away):
    torch.manual_seed(0)
    model = _with_trained_statistics(get_model(network, num_features=64))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model)

    bn_before, bn_after = _count(model, nn.BatchNorm2d), _count(folded, nn.BatchNorm2d)
    # mbf: every BatchNorm2d follows its convolution in a Sequential; r18: only the four
    # downsample branches (one per stage: each starts with stride 2) do,
    # since its blocks apply bn1 before conv1.
    assert bn_before - bn_after == (bn_before if folded_away == "all" else folded_away)
    assert not folded.training

    x = torch.randn(3, 3, 112, 112)
    model.eval()
    with torch.no_grad():
        expected = model(x)
        got = folded(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())

    model.train()
    assert model.training and all(m.training for m in model.modules())  # the model's own modes
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert _count(model, nn.BatchNorm2d) == bn_before
