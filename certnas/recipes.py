"""Named training recipes: the settings behind committed full-MNIST results, for ``certnas train --config NAME``.

A recipe is a mapping of ``certnas train`` option names to values, read where a ``--config`` file would be
(defaults < recipe < flags given on the command line). Each names the committed result it reproduces (train
prints it unless ``-q``);
``--data-root`` is still the user's (the recipes train on ``--data mnist``, see ``certnas data mnist``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping


@dataclass(frozen=True)
class Recipe:
    """Settings (option name -> value) and the committed result they gave."""
    settings: Mapping[str, Any]
    result: str


_SMALL_CNN = {"data": "mnist", "network": "cnn", "cnn": "small", "epochs": 20}

RECIPES: Dict[str, Recipe] = {
    "mnist-ibp-0.1": Recipe(
        {**_SMALL_CNN, "mode": "ibp", "eps": 0.1, "eps-train": 0.2},
        "94.69% IBP-verified at L-inf 0.1 on the 10,000 test digits, 12.6 min on 2 CPU cores "
        "(benchmarks/results/full-mnist/cnn-small-ibp)"),
    "mnist-crown-ibp-0.3": Recipe(
        {**_SMALL_CNN, "mode": "crown-ibp", "eps": 0.3, "eps-train": 0.4},
        "85.20% IBP-verified at L-inf 0.3 on the 10,000 test digits, 13.1 min on 2 CPU cores "
        "(benchmarks/results/full-mnist/cnn-small-crown-ibp-eps0.3)"),
}


def recipe_settings(name: str) -> Dict[str, Any]:
    """The option values of recipe ``name`` (KeyError if there is none)."""
    return dict(RECIPES[name].settings)
