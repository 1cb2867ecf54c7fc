"""Every margin by name: `get_margin(name, **params)` and, for the training script,
`build_margin(cfg)` from the config keys `loss`, `loss_params`, `margin_list`,
`margin_scale`, `interclass_filtering_threshold`, `num_subcenters` and `seed`.

Defaults are the papers' / reference repositories' training defaults (see each module
and docs/losses.md). With `build_margin`, s defaults to `margin_scale` for every loss and
`combined` takes (m1, m2, m3) from `margin_list`, so configs without `loss` train as
before; `loss_params` overrides any of them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from losses.adaface import AdaFaceMargin
from losses.curricularface import CurricularFaceMargin
from losses.elasticface import ElasticFaceMargin
from losses.magface import MagFaceMargin
from losses.margin import CombinedMarginLoss, Margin
from losses.subcenter import MAX_SUBCENTERS

# ElasticFace+'s std (its config/config.py) where `plus=True` and no std is given.
_ELASTIC_PLUS_STD = {"elasticface_arc": 0.0175, "elasticface_cos": 0.02}


@dataclass(frozen=True)
class _Spec:
    build: Callable[..., Margin]
    defaults: dict[str, Any]
    reference: str
    # Keyword arguments the run supplies (not loss_params): the seed of random margins,
    # interclass filtering of the combined family.
    run_args: tuple[str, ...] = field(default=())


def _combined(s, m1, m2, m3, interclass_filtering_threshold=0.0):
    return CombinedMarginLoss(s, m1, m2, m3, interclass_filtering_threshold)


def _arcface(s, m, interclass_filtering_threshold=0.0):
    margin = CombinedMarginLoss(s, 1.0, m, 0.0, interclass_filtering_threshold)
    margin.name = "arcface"
    return margin


def _cosface(s, m, interclass_filtering_threshold=0.0):
    margin = CombinedMarginLoss(s, 1.0, 0.0, m, interclass_filtering_threshold)
    margin.name = "cosface"
    return margin


def _elastic(angular: bool, name: str):
    def build(s, m, std, plus, seed=0):
        if std is None:
            std = _ELASTIC_PLUS_STD[name] if plus is True else 0.05
        return ElasticFaceMargin(s, m, std, plus, angular=angular, seed=seed)

    return build


_FILTERING = ("interclass_filtering_threshold",)
LOSSES: dict[str, _Spec] = {
    "combined": _Spec(_combined, dict(s=64.0, m1=1.0, m2=0.5, m3=0.0),
                      "ArcFace paper (Deng et al. 2019), insightface arcface_torch", _FILTERING),
    "arcface": _Spec(_arcface, dict(s=64.0, m=0.5), "Deng et al. 2019", _FILTERING),
    "cosface": _Spec(_cosface, dict(s=64.0, m=0.4), "Wang et al. 2018; m=0.4 as insightface", _FILTERING),
    "adaface": _Spec(AdaFaceMargin, dict(s=64.0, m=0.4, h=0.333, t_alpha=0.01), "Kim et al. 2022, mk-minchul/AdaFace"),
    "magface": _Spec(MagFaceMargin, dict(s=64.0, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=35.0),
                     "Meng et al. 2021, IrvingMeng/MagFace"),
    "curricularface": _Spec(CurricularFaceMargin, dict(s=64.0, m=0.5), "Huang et al. 2020, HuangYG123/CurricularFace"),
    "elasticface_arc": _Spec(_elastic(True, "elasticface_arc"), dict(s=64.0, m=0.5, std=None, plus=False),
                             "Boutros et al. 2022, fdbtrs/ElasticFace", ("seed",)),
    "elasticface_cos": _Spec(_elastic(False, "elasticface_cos"), dict(s=64.0, m=0.35, std=None, plus=False),
                             "Boutros et al. 2022, fdbtrs/ElasticFace", ("seed",)),
}


def available_losses() -> list[str]:
    return list(LOSSES)


def loss_parameters(name: str) -> dict[str, Any]:
    """The parameters of loss `name` and their defaults (std=None: 0.05, or ElasticFace+'s with plus)."""
    return dict(_spec(name).defaults)


def _spec(name: str) -> _Spec:
    if not isinstance(name, str) or name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid losses: {', '.join(LOSSES)}")
    return LOSSES[name]


def _check_type(name: str, key: str, value: Any) -> None:
    if key == "plus":
        ok, expected = isinstance(value, bool), "True or False"
    else:  # std=None stands for its default
        ok = (key == "std" and value is None) or (isinstance(value, (int, float)) and not isinstance(value, bool))
        expected = "a number"
    if not ok:
        raise ValueError(f"{key} of loss {name!r} must be {expected}, got {value!r}")


def get_margin(name: str, **params) -> Margin:
    """The margin `name` with `params` (unset ones take their defaults).

    Raises ValueError naming the loss, the parameter, the bad value and what is valid.
    """
    spec = _spec(name)
    run_args = {k: params.pop(k) for k in list(params) if k in spec.run_args}
    unknown = [k for k in params if k not in spec.defaults]
    if unknown:
        raise ValueError(
            f"loss {name!r} has no parameter {unknown[0]!r}; its parameters: {', '.join(spec.defaults)}"
        )
    for key, value in params.items():
        _check_type(name, key, value)
    return spec.build(**{**spec.defaults, **params}, **run_args)


def build_margin(cfg, where: str | None = None) -> Margin:
    """The margin the config asks for; a ConfigError (one line naming the key, the value and
    what is valid) for an unknown loss or parameter, or a value out of range.

    Also checks `num_subcenters` (the head's, but part of the same config block).
    """
    from utils.config import ConfigError

    where = where or cfg.get("config_file") or "config"
    name = cfg.get("loss", "combined")
    if not isinstance(name, str) or name not in LOSSES:
        raise ConfigError(f"{where}: loss {name!r} is unknown; valid losses: {', '.join(LOSSES)}")
    params = cfg.get("loss_params") or {}
    if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
        raise ConfigError(f"{where}: loss_params must be a dict of parameter names, e.g. dict(m=0.4), got {params!r}")
    spec = LOSSES[name]
    unknown = [k for k in params if k not in spec.defaults]
    if unknown:
        raise ConfigError(
            f"{where}: loss_params: {unknown[0]!r} is not a parameter of loss {name!r}; "
            f"valid: {', '.join(spec.defaults)}"
        )
    k = cfg.get("num_subcenters", 1)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_SUBCENTERS:
        raise ConfigError(f"{where}: num_subcenters must be an integer in [1, {MAX_SUBCENTERS}], got {k!r}")
    threshold = float(cfg.get("interclass_filtering_threshold", 0.0) or 0.0)
    if threshold > 0 and "interclass_filtering_threshold" not in spec.run_args:
        raise ConfigError(
            f"{where}: interclass_filtering_threshold={threshold} works with loss combined, arcface or cosface "
            f"only, not {name!r}; set it to 0"
        )

    run_defaults: dict[str, Any] = {"s": cfg.get("margin_scale", 64.0)}
    if name == "combined":
        run_defaults.update(zip(("m1", "m2", "m3"), cfg.get("margin_list", (1.0, 0.5, 0.0))))
    run_args: dict[str, Any] = {}
    if "interclass_filtering_threshold" in spec.run_args:
        run_args["interclass_filtering_threshold"] = threshold
    if "seed" in spec.run_args:
        run_args["seed"] = int(cfg.get("seed", 0))
    try:
        return get_margin(name, **{**run_defaults, **params}, **run_args)
    except ValueError as exc:
        sources = [f"loss_params={params!r}", f"margin_scale={run_defaults['s']!r}"]
        if name == "combined":
            sources.append(f"margin_list={tuple(cfg.get('margin_list', ()))!r}")
        raise ConfigError(f"{where}: loss {name!r} with {', '.join(sources)}: {exc}") from None
