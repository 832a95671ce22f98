"""Configuration dataclasses and strict construction from dictionaries and the command line."""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
from fractions import Fraction
from typing import Any, Mapping, Optional, Type, TypeVar

from certnas.errors import CertnasError

T = TypeVar("T")


class ConfigError(CertnasError):
    """An unknown, misspelt or invalid setting."""


def parse_eps(text: Any) -> float:
    """``"2/255"``, ``"0.01"`` or a number -> float >= 0, without eval. Raises ConfigError."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        raw = str(text).strip()
        try:
            if "/" in raw:
                numerator, denominator = (Fraction(part.strip()) for part in raw.split("/", 1))
            else:
                numerator, denominator = Fraction(raw), Fraction(1)
        except (ValueError, ZeroDivisionError):
            raise ConfigError(f"eps {raw!r} is not a number or fraction like 2/255") from None
        if denominator == 0:
            raise ConfigError(f"eps {raw!r}: division by zero")
        value = float(numerator / denominator)
    if math.isnan(value) or math.isinf(value) or value < 0:
        raise ConfigError(f"eps must be a finite number >= 0, got {text!r}")
    return value


def from_dict(cls: Type[T], values: Mapping[str, Any], base: Optional[T] = None) -> T:
    """Build dataclass ``cls`` from ``values`` over ``base`` (or the defaults); unknown keys fail
    with a close-match suggestion."""
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown setting {key!r} for {cls.__name__}{hint}")
    current = dataclasses.asdict(base) if base is not None else {}
    current.update(values)
    return cls(**current)


def upgrade_saved(cls: Type[Any], saved: Mapping[str, Any]) -> dict:
    """Settings of ``cls`` saved by an earlier version, in today's form: renamed settings translated
    (``cls.upgrade``, where it has one) and settings added since then at their defaults."""
    saved = dict(getattr(cls, "upgrade", dict)(saved))
    for f in dataclasses.fields(cls):
        if f.name not in saved and f.default is not dataclasses.MISSING:
            saved[f.name] = f.default
    return saved


def to_json(config: Any) -> str:
    return json.dumps(dataclasses.asdict(config), indent=2, sort_keys=True, default=str)
