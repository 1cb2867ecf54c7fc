"""Experiment configuration: `configs/base.py` defaults + one module per experiment + `--key=value`.

A config module defines a module-level `config` (a `Config`, a plain dict, or
insightface's `EasyDict`). Only keys that `configs/base.py` knows are accepted,
so a typo stops the run with the closest known key instead of being ignored.
Types are checked against the defaults' types.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
import sys
import types
from pathlib import Path
from typing import Any, Iterable

from utils.atomic_file import atomic_write
from utils.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO_ROOT / "configs" / "base.py"


class ConfigError(UserError, ValueError):
    """A bad config file, key or value. The message is one line meant for the user."""


class Config(dict):
    """A dict with attribute access (what insightface's configs get from EasyDict)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name) from None

    def copy(self) -> "Config":
        return Config(self)


# Keys whose default is None: what they may hold instead.
_NONE_DEFAULT_TYPES: dict[str, tuple[type, ...]] = {
    "output": (str,),
    "suffix_run_name": (str,),
    "pretrained": (str,),
    "pretrained_fc": (str,),
    "device": (str,),
    "gradient_checkpointing": (bool,),
    "synthetic_faces": (dict,),
    "max_steps": (int,),
    "num_classes": (int,),
    "num_image": (int,),
    "teacher": (str,),
    "teacher_network": (str,),
    "teacher_embedding_size": (int,),
}

# Values accepted besides the default's type.
_EXTRA_TYPES: dict[str, tuple[type, ...]] = {
    "resume": (type(None),),  # some insightface configs write `resume = None`
    "warmup_epoch": (float,),
}

# Keys of older insightface releases that no longer mean anything; say what replaced them.
_LEGACY_KEYS = {
    "decay_epoch": "the learning rate follows the PolyScheduler (lr, num_epoch, warmup_epoch)",
    "lr_func": "the learning rate follows the PolyScheduler (lr, num_epoch, warmup_epoch)",
}


def _install_easydict_shim() -> None:
    """Let insightface config modules (`from easydict import EasyDict as edict`) load unchanged.

    Only used when the real easydict is not installed; the shim's EasyDict is our Config.
    """
    if "easydict" in sys.modules:
        return
    if importlib.util.find_spec("easydict") is not None:
        return
    shim = types.ModuleType("easydict")
    shim.EasyDict = Config  # type: ignore[attr-defined]
    shim.__doc__ = "Compatibility shim installed by utils.config: EasyDict is utils.config.Config."
    sys.modules["easydict"] = shim


def resolve_config_path(name: str) -> Path:
    """`configs/ms1mv3_r50`, `configs/ms1mv3_r50.py`, `ms1mv3_r50` or any path to a .py module."""
    candidates = []
    p = Path(name)
    candidates.append(p)
    if p.suffix != ".py":
        candidates.append(p.with_name(p.name + ".py"))
    # A bare experiment name refers to the shipped configs.
    candidates.append(REPO_ROOT / "configs" / (p.name if p.suffix == ".py" else p.name + ".py"))
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise ConfigError(f"config file not found: {name} (looked for {', '.join(str(c) for c in candidates[:2])})")


def _load_module_config(path: Path) -> dict:
    _install_easydict_shim()
    # A config module may import the project's packages (`from utils.config import Config`):
    # they are importable wherever this module was imported from.
    module_name = f"_face_config_{path.stem}_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load config file {path}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # a broken user module: say which file and why, in one line
        raise ConfigError(f"error while executing config file {path}: {type(exc).__name__}: {exc}") from exc
    if not hasattr(module, "config"):
        raise ConfigError(f"config file {path} does not define `config`")
    cfg = module.config
    if not isinstance(cfg, dict):
        raise ConfigError(f"`config` in {path} must be a dict-like object, got {type(cfg).__name__}")
    return dict(cfg)


def closest_key(key: str, known: Iterable[str]) -> str | None:
    matches = difflib.get_close_matches(key, list(known), n=1, cutoff=0.5)
    return matches[0] if matches else None


def _unknown_key_error(key: str, known: Iterable[str], where: str) -> ConfigError:
    if key in _LEGACY_KEYS:
        return ConfigError(f"{where}: key '{key}' is no longer supported: {_LEGACY_KEYS[key]}")
    hint = closest_key(key, known)
    suffix = f"; did you mean '{hint}'?" if hint else ""
    return ConfigError(f"{where}: unknown config key '{key}'{suffix}")


def _type_name(types_: tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in types_)


def _allowed_types(key: str, default: Any) -> tuple[type, ...]:
    return _default_types(key, default) + _EXTRA_TYPES.get(key, ())


def _default_types(key: str, default: Any) -> tuple[type, ...]:
    if default is None:
        return _NONE_DEFAULT_TYPES.get(key, (str,)) + (type(None),)
    if isinstance(default, bool):
        return (bool,)
    if isinstance(default, int):
        return (int,)
    if isinstance(default, float):
        return (float, int)
    if isinstance(default, (list, tuple)):
        return (list, tuple)
    return (type(default),)


def check_value(key: str, value: Any, default: Any, where: str) -> Any:
    allowed = _allowed_types(key, default)
    # bool is a subclass of int: `batch_size=True` is a mistake, not 1.
    ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
    if not ok:
        raise ConfigError(
            f"{where}: key '{key}' expects {_type_name(tuple(t for t in allowed if t is not type(None)))}"
            f"{' or None' if type(None) in allowed else ''}, got {value!r} ({type(value).__name__})"
        )
    if isinstance(default, float) and isinstance(value, int):
        value = float(value)
    return value


def parse_override(arg: str) -> tuple[str, Any]:
    """`--key=value` (value parsed as a Python literal, else kept as a string); `--key` means True."""
    if not arg.startswith("--"):
        raise ConfigError(f"command line: expected --key=value, got '{arg}'")
    body = arg[2:]
    if "=" not in body:
        return body.replace("-", "_"), True
    key, raw = body.split("=", 1)
    key = key.replace("-", "_")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = _keyword_dict(raw)
    return key, value


def _keyword_dict(raw: str) -> Any:
    """`dict(m=0.4, h=0.333)` (keyword arguments that are literals) as a dict; else `raw` unchanged."""
    try:
        node = ast.parse(raw, mode="eval").body
    except SyntaxError:
        return raw
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict") or node.args:
        return raw
    if any(kw.arg is None for kw in node.keywords):
        return raw
    try:
        return {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
    except ValueError:
        return raw


def load_config(path: str, overrides: Iterable[str] = ()) -> Config:
    """Merge base defaults, the experiment module and command-line overrides, then validate."""
    overrides = list(overrides)
    base = _load_module_config(BASE_CONFIG)
    config_path = resolve_config_path(path)
    job = _load_module_config(config_path) if config_path != BASE_CONFIG.resolve() else {}

    cfg = Config(base)
    for key, value in job.items():
        if key not in base:
            raise _unknown_key_error(key, base, str(config_path))
        cfg[key] = check_value(key, value, base[key], str(config_path))
    for arg in overrides:
        key, value = parse_override(arg)
        if key not in base:
            raise _unknown_key_error(key, base, "command line")
        cfg[key] = check_value(key, value, base[key], "command line")

    cfg.config_file = str(config_path)  # not a user key: recorded for config.json and logs
    cfg.config_name = config_path.stem
    if not cfg.output:
        cfg.output = os.path.join("work_dirs", config_path.stem)
    validate(cfg, where=f"{config_path}{' with command-line overrides' if overrides else ''}")
    return cfg


def validate(cfg: Config, where: str = "config") -> None:
    """Value checks that do not need the data set."""
    margins = cfg.margin_list
    if len(margins) != 3 or not all(isinstance(m, (int, float)) for m in margins):
        raise ConfigError(f"{where}: margin_list must be three numbers (m1, m2, m3), got {margins!r}")
    if not 0.0 < cfg.sample_rate <= 1.0:
        raise ConfigError(f"{where}: sample_rate must be in (0, 1], got {cfg.sample_rate}")
    for key in ("batch_size", "embedding_size", "gradient_acc", "num_epoch", "frequent", "verbose"):
        if cfg[key] <= 0:
            raise ConfigError(f"{where}: {key} must be positive, got {cfg[key]}")
    for key in ("num_classes", "num_image"):
        if cfg[key] is not None and cfg[key] <= 0:
            raise ConfigError(f"{where}: {key} must be positive, got {cfg[key]}")
    if cfg.optimizer not in ("sgd", "adamw"):
        raise ConfigError(f"{where}: optimizer must be 'sgd' or 'adamw', got {cfg.optimizer!r}")
    if cfg.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"{where}: precision must be 'auto', 'fp32', 'bf16' or 'fp16', got {cfg.precision!r}")
    if cfg.fc_state_dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"{where}: fc_state_dtype must be 'float32' or 'bfloat16', got {cfg.fc_state_dtype!r}")
    chunk = cfg.logits_chunk_rows
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
        raise ConfigError(f"{where}: logits_chunk_rows must be an integer >= 0 (0: all rows at once), got {chunk!r}")
    if cfg.lr <= 0:
        raise ConfigError(f"{where}: lr must be positive, got {cfg.lr}")
    if not isinstance(cfg.val_targets, (list, tuple)) or not all(isinstance(t, str) for t in cfg.val_targets):
        raise ConfigError(f"{where}: val_targets must be a list of names, got {cfg.val_targets!r}")


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the effective config as JSON (tuples become lists)."""
    with atomic_write(path, "w") as f:
        json.dump(dict(cfg), f, indent=2, sort_keys=True, default=str)
        f.write("\n")


def format_config(cfg: Config) -> str:
    width = max(len(k) for k in cfg)
    return "\n".join(f"  {k.ljust(width)} : {cfg[k]!r}" for k in sorted(cfg))
