"""The registry of named backbone constructors and the one door to them, `get_model`.

Every architecture module registers its named constructors with `@register_model(name)`;
a constructor takes keyword arguments only, and its signature is the list of keyword
arguments that `get_model` accepts for that name.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Callable, TypeVar

from torch import nn

ModelFactory = TypeVar("ModelFactory", bound=Callable[..., nn.Module])

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: make `factory` reachable as `get_model(name, **kwargs)`."""

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY:
            raise ValueError(f"backbone name {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return decorator


def available_models() -> list[str]:
    """Every registered backbone name, in registration order."""
    return list(_REGISTRY)


def get_model(name: str, **kwargs) -> nn.Module:
    """Build the backbone registered as `name`.

    Common keyword arguments: dropout (float, 0), fp16 (bool, False: the trunk runs under
    autocast by itself), num_features (int, 512), gradient_checkpointing (bool; on by default
    for the large ViTs). Unknown names raise ValueError, unknown keywords TypeError.
    """
    factory = _REGISTRY.get(name)
    if factory is None:
        valid = available_models()
        closest = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.0)
        hint = f" The closest valid name is {closest[0]!r}." if closest else ""
        raise ValueError(f"unknown backbone {name!r}.{hint} Valid names: {', '.join(valid)}")
    accepted = _keyword_names(factory)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise TypeError(
            f"get_model({name!r}) got unknown keyword argument(s) {', '.join(map(repr, unknown))}; "
            f"it accepts {', '.join(sorted(accepted))}"
        )
    _check_common_values(name, kwargs)
    return factory(**kwargs)


def _keyword_names(factory: Callable[..., nn.Module]) -> set[str]:
    parameters = inspect.signature(factory).parameters.values()
    return {p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def _check_common_values(name: str, kwargs: dict) -> None:
    # Caught here so a typo in a config fails with the key's name, not deep in nn.Dropout.
    for key in ("fp16", "gradient_checkpointing"):
        if key in kwargs and not isinstance(kwargs[key], bool):
            raise TypeError(f"get_model({name!r}): {key} must be a bool, got {kwargs[key]!r}")
    if "num_features" in kwargs:
        value = kwargs["num_features"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"get_model({name!r}): num_features must be a positive int, got {value!r}")
    if "dropout" in kwargs:
        value = kwargs["dropout"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"get_model({name!r}): dropout must be a float in [0, 1), got {value!r}")
