"""Face-recognition backbones. `get_model(name, **kwargs)` builds any of `available_models()`.

Importing the architecture modules registers their named constructors.
"""
from . import iresnet, mobilefacenet, vit  # noqa: F401  (registration side effect only)
from .registry import available_models, get_model, register_model

__all__ = ["available_models", "get_model", "register_model"]
