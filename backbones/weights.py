"""The one way to read backbone weights from a file and put them into a network.

Used by training (`pretrained`, a distillation teacher), evaluation, inference and
ONNX export alike. Accepts what users have on disk: our or insightface's `model.pt` /
`backbone.pth` (a plain state_dict), a training checkpoint (`checkpoint_gpu_0.pt`, the
backbone under `state_dict_backbone`), weights saved from a DDP-wrapped (`module.`) or
`torch.compile`d (`_orig_mod.`) model.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from utils.errors import UserError

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class WeightsError(UserError, ValueError):
    """A weights file that cannot be read, or does not fit the network; the message names the file."""


def strip_wrapper_prefixes(state_dict: dict) -> dict:
    """Keys as the plain module names them (DDP adds `module.`, torch.compile `_orig_mod.`)."""
    out = {}
    for key, value in state_dict.items():
        for prefix in _WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def read_backbone_state_dict(path: str | os.PathLike) -> dict:
    """The backbone state_dict stored in `path`, with wrapper prefixes removed."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: weights file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise WeightsError(f"{path}: cannot be read as a PyTorch state_dict ({type(exc).__name__}: {first})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict_backbone"), dict):
        obj = obj["state_dict_backbone"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a backbone state_dict (a dict of tensors), found {type(obj).__name__}")
    return strip_wrapper_prefixes(obj)


def embedding_size_of(state_dict: dict) -> int | None:
    """The output size, read from the last BatchNorm1d of the head (every backbone family ends in one)."""
    for key in reversed(list(state_dict)):
        value = state_dict[key]
        if key.endswith("running_mean") and value.ndim == 1:
            return int(value.shape[0])
    return None


def mismatch_summary(model: nn.Module, state_dict: dict) -> str:
    """Missing, unexpected and mis-shaped keys, three of each at most."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch (file vs network)", shapes)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            parts.append(f"{label}: {', '.join(items[:3])}{more}")
    return "; ".join(parts)


def load_state_dict_into(model: nn.Module, state_dict: dict, source: str, name: str | None = None) -> nn.Module:
    """`model.load_state_dict(state_dict, strict=True)` with a one-line error naming `source`."""
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError:
        name = name or type(model).__name__
        raise WeightsError(
            f"{source}: the weights do not fit network {name!r}: {mismatch_summary(model, state_dict)}"
        ) from None
    return model


def load_backbone_weights(
    path: str | os.PathLike,
    network: str | nn.Module,
    *,
    embedding_size: int | None = None,
    **model_kwargs,
) -> nn.Module:
    """A backbone with the weights of `path` loaded (strict).

    `network` is a `get_model` name (the network is built with the embedding size read
    from the weights unless `embedding_size` is given) or a module to load into.
    """
    from backbones.registry import available_models, get_model

    path = os.fspath(path)
    state_dict = read_backbone_state_dict(path)
    if isinstance(network, nn.Module):
        return load_state_dict_into(network, state_dict, path)
    if network not in available_models():
        raise WeightsError(f"unknown network {network!r}; valid networks: {', '.join(available_models())}")
    size = embedding_size or embedding_size_of(state_dict) or 512
    model_kwargs.setdefault("dropout", 0.0)
    model_kwargs.setdefault("fp16", False)
    model = get_model(network, num_features=size, **model_kwargs)
    return load_state_dict_into(model, state_dict, path, network)
