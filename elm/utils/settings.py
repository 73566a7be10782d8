"""Checking settings before anything loads: each message names the key, the value and what is
valid. :func:`compose_config` composes another command's config (overrides included) so that a
command driving others (``elm.compare``, ``elm.causal.pipeline``) can check theirs up front too."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


def check_number(key: str, value: Any, low: float, *, integer: bool = True, none: bool = False,
            strict: bool = False, high: float | None = None) -> None:  # fmt: skip
    """``value`` is a number (an int when ``integer``) >= ``low`` (> with ``strict``), <= ``high``."""
    if value is None and none:
        return
    kind = int if integer else (int, float)
    ok = isinstance(value, kind) and not isinstance(value, bool)
    ok = ok and (value > low if strict else value >= low) and (high is None or value <= high)
    if not ok:
        what = "an integer" if integer else "a number"
        rng = f"{'>' if strict else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
        raise ValueError(f"{key}={value!r} must be {what} {rng}" + (" (or null)" if none else ""))


def check_choice(key: str, value: Any, valid: Iterable[Any]) -> None:
    """``value`` is one of ``valid``."""
    valid = tuple(valid)
    if isinstance(value, bool) or value not in valid:  # true == 1 would pass `in`
        raise ValueError(f"{key}={value!r} is unknown; valid: {', '.join(map(str, valid))}")


def check_flag(key: str, value: Any) -> None:
    """``value`` is true or false (not 0/1 or a string)."""
    if not isinstance(value, bool):
        raise ValueError(f"{key}={value!r} must be true or false")


def to_dataclass(cls: type, node: Any, group: str) -> Any:
    """``cls(**node)`` with unknown keys named (``group`` has unknown key(s) ..., valid: ...)."""
    from dataclasses import fields

    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{group} has unknown key(s) {unknown}; valid: {sorted(names)}")
    return cls(**data)


def compose_config(name: str, overrides: list[str], merge: Any = None, what: str | None = None) -> DictConfig:
    """``configs/<name>.yaml`` with Hydra ``overrides`` (group choices too), then ``merge`` on top.

    Works inside a Hydra app (same config dir) and outside one. A bad override is one
    ``ValueError`` line naming ``what`` (default ``<name>_overrides``).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from .cli import CONFIG_DIR

    what = what or f"{name}_overrides"
    try:
        if GlobalHydra.instance().is_initialized():
            cfg = compose(config_name=name, overrides=list(overrides))
        else:
            with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
                cfg = compose(config_name=name, overrides=list(overrides))
    except Exception as err:  # unknown key, bad type, hydra's override parse / missing group errors
        if type(err).__module__.startswith(("hydra", "omegaconf")):
            raise ValueError(f"{what}: {err}".splitlines()[0]) from None
        raise
    try:
        return OmegaConf.merge(cfg, merge) if merge else cfg
    except OmegaConfBaseException as err:
        raise ValueError(f"{name} settings: {err}".splitlines()[0]) from None
