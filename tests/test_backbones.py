"""Every registered backbone: insightface's state_dict layout, parameter counts, output shapes,
gradients, gradient checkpointing, the fp16 trunk and ViT's training-only masking.

Shapes and counts of all networks are checked on the meta device (no memory, no compute),
so r200 and vit_h are covered as cheaply as r18; numerical checks use the small ones.
"""
import json

import pytest
import torch
import torch.nn.functional as F

from backbones import available_models, get_model
from backbones.weights import load_backbone_weights
from conftest import SHARED_TESTDATA

REFERENCE_KEYS = json.loads((SHARED_TESTDATA / "backbone_keys.json").read_text())

# Millions of parameters (REFERENCE.md section 1), to the precision published there.
PUBLISHED_PARAMS_M = {
    "r18": (24.03, 2), "r34": (34.14, 2), "r50": (43.59, 2), "r100": (65.16, 2), "r200": (118.83, 2),
    "mbf": (2.06, 2), "mbf_large": (6.31, 2),
    "vit_t": (19.1, 1), "vit_s": (76.0, 1), "vit_b": (113.8, 1), "vit_l": (255.7, 1),
}

INSIGHTFACE_NAMES = [
    "r18", "r34", "r50", "r100", "r200", "mbf", "mbf_large", "vit_t", "vit_t_dp005_mask0", "vit_s",
    "vit_s_dp005_mask_0", "vit_b", "vit_b_dp005_mask_005", "vit_l_dp005_mask_005", "vit_h",
]


def _meta_model(name, **kwargs):
    with torch.device("meta"):
        return get_model(name, **kwargs)


def test_registry_has_every_insightface_name():
    assert set(INSIGHTFACE_NAMES) <= set(available_models())


@pytest.mark.parametrize("name", sorted(REFERENCE_KEYS))
def test_state_dict_keys_and_shapes_equal_the_reference(name):
    model = _meta_model(name, dropout=0.0, fp16=False, num_features=512)
    ours = [[key, list(value.shape)] for key, value in model.state_dict().items()]
    assert ours == REFERENCE_KEYS[name]


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS_M))
def test_parameter_count_matches_the_published_one(name):
    published, digits = PUBLISHED_PARAMS_M[name]
    count = sum(p.numel() for p in _meta_model(name).parameters())
    assert round(count / 1e6, digits) == published


def test_mbf_small_has_the_mobilefacenet_papers_size():
    # Chen et al. 2018, MobileFaceNet with a 128-d embedding: 0.99M parameters; ours count the
    # PReLU slopes and the final BatchNorm's affine too (1.003M).
    count = sum(p.numel() for p in _meta_model("mbf_small", num_features=128).parameters())
    assert abs(count / 0.99e6 - 1) < 0.02
    small = {key: value.shape for key, value in _meta_model("mbf_small").state_dict().items()}
    full = {key: value.shape for key, value in _meta_model("mbf").state_dict().items()}
    assert small.keys() == full.keys()  # mbf's layout at half the width: mbf's names, other shapes
    assert small["layers.0.layers.0.weight"] == (64, 3, 3, 3) and full["layers.0.layers.0.weight"] == (128, 3, 3, 3)


@pytest.mark.parametrize("name", available_models())
def test_output_shape_for_every_backbone(name):
    model = _meta_model(name, num_features=256).eval()
    out = model(torch.empty(3, 3, 112, 112, device="meta"))
    assert tuple(out.shape) == (3, 256) and out.dtype == torch.float32


def _reference_shaped_weights(name: str, seed: int = 0) -> dict:
    """Random weights built from the reference key list alone (insightface's names and shapes),
    not from our model. Scaled so that a signal survives the depth: matrices and kernels
    ~ 1/sqrt(fan-in), norm gains near 1, PReLU slopes (a 1-d weight without a bias) in (0, 0.5)."""
    g = torch.Generator().manual_seed(seed)
    keys = {key for key, _ in REFERENCE_KEYS[name]}
    weights = {}
    for key, shape in REFERENCE_KEYS[name]:
        fan_in = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) >= 2 else 1
        if key.endswith("num_batches_tracked"):
            weights[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            weights[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith(".weight") and len(shape) == 1:
            prelu = key.removesuffix("weight") + "bias" not in keys
            weights[key] = torch.rand(shape, generator=g) * 0.5 if prelu else torch.rand(shape, generator=g) + 0.5
        elif len(shape) >= 2 and key.endswith(".weight"):
            weights[key] = torch.randn(shape, generator=g) / fan_in**0.5
        else:  # biases, running means, positional embedding, mask token
            weights[key] = torch.randn(shape, generator=g) * 0.1
    return weights


def _bn(x, w, prefix, eps):
    return F.batch_norm(x, w[f"{prefix}.running_mean"], w[f"{prefix}.running_var"], w[f"{prefix}.weight"],
                        w[f"{prefix}.bias"], training=False, eps=eps)


# Per network, computed by hand from the weights by their insightface names (REFERENCE.md 1):
# the stem (the module whose output it is, and the formula) and the embedding head (the last
# Linear, given its input, then the last BatchNorm1d: the network's output).
HAND_COMPUTED = {
    "r18": dict(
        stem="prelu",
        stem_fn=lambda w, x: F.prelu(_bn(F.conv2d(x, w["conv1.weight"], padding=1), w, "bn1", 1e-5), w["prelu.weight"]),
        linear="fc", head_fn=lambda w, h: _bn(F.linear(h, w["fc.weight"], w["fc.bias"]), w, "features", 1e-5),
    ),
    "mbf": dict(
        stem="layers.0",
        stem_fn=lambda w, x: F.prelu(
            _bn(F.conv2d(x, w["layers.0.layers.0.weight"], stride=2, padding=1), w, "layers.0.layers.1", 1e-5),
            w["layers.0.layers.2.weight"]),
        linear="features.layers.2",
        head_fn=lambda w, h: _bn(F.linear(h, w["features.layers.2.weight"]), w, "features.layers.3", 1e-5),
    ),
    "vit_t": dict(
        stem="patch_embed",
        stem_fn=lambda w, x: F.conv2d(x, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=9)
        .flatten(2).transpose(1, 2),
        linear="feature.2", head_fn=lambda w, h: _bn(F.linear(h, w["feature.2.weight"]), w, "feature.3", 2e-5),
    ),
}


@pytest.mark.parametrize("name", sorted(HAND_COMPUTED))
def test_released_weights_load_by_name_and_compute_what_insightface_names_mean(name, tmp_path):
    """Weights shaped like insightface's release (a DDP `module.` checkpoint, as its training
    writes) load strictly through the one weight loader, and the loaded network computes its
    stem and its embedding head from them exactly as the reference formulas do."""
    weights = _reference_shaped_weights(name)
    path = tmp_path / "backbone.pth"
    torch.save({f"module.{k}": v for k, v in weights.items()}, path)
    model = load_backbone_weights(path, name).eval()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())

    spec = HAND_COMPUTED[name]
    seen = {}
    model.get_submodule(spec["stem"]).register_forward_hook(lambda m, i, o: seen.update(stem=o))
    model.get_submodule(spec["linear"]).register_forward_hook(lambda m, i, o: seen.update(head_input=i[0]))
    x = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(seen["stem"], spec["stem_fn"](weights, x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out, spec["head_fn"](weights, seen["head_input"]), rtol=1e-5, atol=1e-5)
    assert out.shape == (2, 512) and (out[0] - out[1]).abs().mean() > 0.05  # the output depends on the input


@pytest.mark.parametrize("name", ["r18", "mbf", "vit_t"])
def test_training_step_reaches_every_trainable_parameter(name):
    torch.manual_seed(0)
    model = get_model(name, num_features=64).train()
    out = model(torch.rand(4, 3, 112, 112) * 2 - 1)
    assert out.shape == (4, 64) and torch.isfinite(out).all()
    out.pow(2).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    allowed = {"mask_token"} if name.startswith("vit") else set()  # only used where tokens were dropped
    assert set(missing) <= allowed, missing


def test_iresnet_embedding_batchnorm_gain_is_fixed_at_one():
    model = get_model("r18")
    assert not model.features.weight.requires_grad and torch.all(model.features.weight == 1)


@pytest.mark.parametrize("name", ["r18", "vit_t_dp005_mask0"])
def test_gradient_checkpointing_gives_the_same_gradients(name):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = get_model(name, num_features=32, gradient_checkpointing=checkpointing).train()
        x = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(1)) * 2 - 1
        torch.manual_seed(2)  # the same stochastic-depth draws in both runs
        model(x).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], rtol=1e-4, atol=1e-6)


def test_large_vits_checkpoint_by_default():
    assert _meta_model("vit_b").gradient_checkpointing and _meta_model("vit_h").gradient_checkpointing
    assert not _meta_model("vit_t").gradient_checkpointing
    assert not _meta_model("vit_b", gradient_checkpointing=False).gradient_checkpointing


@pytest.mark.parametrize(
    "name, trunk, head",
    [("r18", "layer4.1.conv2", "fc"), ("mbf", "layers.7.layers.0.layers.2", "features"), ("vit_t", "blocks.11.mlp.fc1", "feature")],
)
def test_fp16_runs_the_trunk_in_low_precision_and_the_head_in_float32(name, trunk, head):
    model = get_model(name, fp16=True, num_features=32).eval()
    seen = {}
    model.get_submodule(trunk).register_forward_hook(lambda m, i, o: seen.update(trunk=o.dtype))
    model.get_submodule(head).register_forward_hook(lambda m, i, o: seen.update(head=o.dtype))
    with torch.no_grad():
        out = model(torch.rand(2, 3, 112, 112))
    # On the CPU the low-precision type is bfloat16 (float16 on CUDA, as insightface).
    assert seen == {"trunk": torch.bfloat16, "head": torch.float32} and out.dtype == torch.float32


def test_vit_masks_patches_in_training_only():
    torch.manual_seed(0)
    model = get_model("vit_t", num_features=32)
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    outputs = {}
    for mode in ("eval", "train"):
        getattr(model, mode)()
        with torch.no_grad():
            outputs[mode] = []
            for seed in (1, 2):  # another random state: other patches would be dropped
                torch.manual_seed(seed)
                outputs[mode].append(model(x))
    torch.testing.assert_close(outputs["eval"][0], outputs["eval"][1], rtol=0, atol=0)  # nothing random in eval
    assert not torch.allclose(outputs["train"][0], outputs["train"][1])
    seen = []
    model.blocks[0].register_forward_hook(lambda m, i, o: seen.append(o.shape[1]) and None)
    model.train()
    model(x)
    model.eval()
    with torch.no_grad():
        model(x)
    assert seen == [int(144 * (1 - 0.1)), 144]  # vit_t drops 10% of the 144 patches in training


def test_unknown_name_keyword_and_input_size_are_clear_errors():
    with pytest.raises(ValueError, match=r"unknown backbone 'r51'.*closest valid name is 'r50'"):
        get_model("r51")
    with pytest.raises(TypeError, match="unknown keyword argument"):
        get_model("r18", dropuot=0.1)
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        get_model("mbf", num_features=0)
    with pytest.raises(ValueError, match="112x112"):
        get_model("mbf").eval()(torch.zeros(1, 3, 96, 96))
