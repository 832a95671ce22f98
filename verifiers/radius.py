"""Certified radius: the largest eps whose margin lower bound is positive, per sample."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn as nn

from verifiers.bounds import BoundMethod, margin_lower_bound
from verifiers.rounding import RTOL, logit_scale


def certified_radius(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: Union[float, str] = math.inf,
                     method: Union[str, BoundMethod] = "crown-ibp", eps_max: Union[float, torch.Tensor] = 1.0,
                     steps: int = 15, eps_min: float = 0.0,
                     attacked: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample certified radius by bisection on [0, eps_max], all samples at once.

    x: (B, ...) in [0, 1]; y: (B,). Returns (B,) radii in pixel units; each returned radius is one
    at which the margin lower bound was computed and found above float32 rounding (greater than
    ``verifiers.rounding``'s tolerance; 0 where even eps = 0 is not certified, e.g. a misclassified
    sample), so the result is sound even where bounds are not monotone in eps. (A probe whose margin
    is positive but within the tolerance counts as not certified: the bisection resolves the radius
    below it instead of paying for a float64 recheck.) After ``steps`` halvings the true bisection radius lies within
    ``eps_max / 2**steps`` above the returned value.

    eps_min > 0 bisects in log space on [eps_min, eps_max] (as CNN-Cert does), for networks whose
    radii span many orders of magnitude: 0 is returned where even eps_min is not certified, and the
    true bisection radius lies within a factor ``(eps_max / eps_min) ** (1 / 2**steps)`` above.
    Keep eps_min above the input's float resolution (about 1e-7 for float32 pixels in [0, 1]):
    below it the ball holds no representable point other than x, and a "radius" certifies rounding.

    eps_max may be a (B,) tensor, e.g. attack radii (no sound radius exceeds them, so bisecting below
    them loses nothing and resolves finer); ``attacked`` (B,) bool marks samples whose eps_max an attack
    already broke: no bound is computed there (it cannot certify), which saves the costliest probe.

    A model in training mode is bounded as the function of the whole batch it is (its batch norm takes
    the batch's statistics): every probe bounds all of x, at eps 0 on the rows it does not probe.
    """
    batch = x.shape[0]
    log = eps_min > 0
    # A training-mode network (batch norm with the batch's statistics) is a function of the whole batch:
    # bounding a subset of it bounds a different function. There every probe bounds the whole batch at
    # per-sample eps (rows not probed at eps 0) and reads the probed rows.
    whole_batch = model.training
    lower = torch.full((batch,), float(eps_min) if log else 0.0, device=x.device, dtype=x.dtype)
    upper = torch.as_tensor(eps_max, device=x.device, dtype=x.dtype).expand(batch).clone().clamp_min(float(eps_min))
    attacked = torch.zeros(batch, dtype=torch.bool, device=x.device) if attacked is None else attacked.to(x.device)
    with torch.no_grad():
        tolerance = RTOL * logit_scale(model, x)

        def certified(index: torch.Tensor, at) -> torch.Tensor:
            if whole_batch:
                eps = torch.zeros(batch, device=x.device, dtype=x.dtype)
                eps[index] = at
                margin = margin_lower_bound(model, x, y, eps, norm=norm, method=method)[index]
            else:
                margin = margin_lower_bound(model, x[index], y[index], at, norm=norm, method=method)
            return margin > tolerance[index]

        everyone = torch.arange(batch, device=x.device)
        certified_zero = certified(everyone, float(eps_min))
        at_max = torch.zeros(batch, dtype=torch.bool, device=x.device)
        probe = (certified_zero & ~attacked).nonzero().flatten()
        if len(probe):
            at_max[probe] = certified(probe, upper[probe])
        lower = torch.where(at_max, upper, lower)
        active = certified_zero & ~at_max
        for _ in range(steps):
            if not active.any():
                break
            index = active.nonzero().flatten()
            middle = (lower[index] * upper[index]).sqrt() if log else (lower[index] + upper[index]) / 2
            ok = certified(index, middle)
            lower[index] = torch.where(ok, middle, lower[index])
            upper[index] = torch.where(ok, upper[index], middle)
    return torch.where(certified_zero, lower, torch.zeros_like(lower))
