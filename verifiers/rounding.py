"""Certificates that do not rest on float32 rounding.

A bound is computed in float32: a long back-substitution sums many terms, and the rounding error of
that sum is not bounded by anything here. Measured: one full-CROWN margin bound of a paper network
came out -3.1915 on a CPU and -3.1896 on a GPU (the same 8,736 unstable neurons, float32 on both), a
difference of 0.0019. A margin that is positive by less than that certifies rounding, not the network.

So a float32 margin is trusted only when it clears a tolerance, ``RTOL * (1 + max |logit|)`` at the
clean input (0.009-0.012 on ten digits of a standard-trained paper network, logits 7.8-10.8): the scale
of the numbers being summed.
A margin in ``(0, tolerance]`` is recomputed in float64 on a float64 copy of the model, where the same
rounding is about 1e-9 times smaller, and the sample is certified only if the float64 margin clears
``RTOL64 * (1 + max |logit|)``. Only the near-zero samples pay for float64 (1.2-4.4x the float32 cost of IBP and
CROWN-IBP on that network, 1 CPU thread). This is a guard against rounding, not a proof with directed
rounding: a float32 error larger than the tolerance would still pass (the largest seen, 0.0019 on
logits near 10, is a fifth of it).
"""
from __future__ import annotations

import copy
import math
import weakref
from typing import Dict, Tuple, Union

import torch
import torch.nn as nn

from verifiers.bounds import BoundMethod, Eps, box_bounds, margin_lower_bound

RTOL = 1e-3
RTOL64 = 1e-9

# model -> (float64 copy, signature of the model's tensors when the copy was made)
_COPIES: "weakref.WeakKeyDictionary[nn.Module, Tuple[nn.Module, tuple]]" = weakref.WeakKeyDictionary()


def _signature(model: nn.Module) -> tuple:
    tensors = list(model.parameters()) + list(model.buffers())
    return tuple((t.data_ptr(), t._version, t.device) for t in tensors)


def float64_copy(model: nn.Module) -> nn.Module:
    """A float64 copy of ``model`` in its train / eval mode, remade whenever a parameter or buffer of
    the model changed (in place or replaced) since the last copy."""
    signature = _signature(model)
    cached = _COPIES.get(model)
    if cached is None or cached[1] != signature:
        duplicate = copy.deepcopy(model).double()
        for p in duplicate.parameters():
            p.requires_grad_(False)
        cached = (duplicate, signature)
        _COPIES[model] = cached
    return cached[0].train(model.training)


def _clean_outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's outputs at x in eval mode, without a graph (a training-mode forward would move
    batch-norm running statistics); the model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(x).detach()
    finally:
        model.train(was_training)


def logit_scale(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``1 + max |logit|`` per sample at the clean input: the scale of a margin's rounding error."""
    return 1.0 + _clean_outputs(model, x).abs().flatten(1).max(1).values


def certified_margin(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: Eps, *,
                     norm: Union[float, str] = math.inf,
                     method: Union[str, BoundMethod] = "crown-ibp",
                     counts: Dict[str, int] = None) -> torch.Tensor:
    """``margin_lower_bound`` for deciding certificates: > 0 means certified, also against rounding.

    Margins above the float32 tolerance are returned as computed; those in ``(0, tolerance]`` are
    replaced by the float64 margin minus its own tolerance (so they are > 0 only where float64 clears
    it); margins <= 0 are returned as computed (they certify nothing either way). Returns (B,) in
    x's dtype, detached. ``counts`` (optional) gets ``rechecked`` and ``rejected`` added."""
    margin = margin_lower_bound(model, x, y, eps, norm=norm, method=method).detach()
    if not len(margin) or not bool((margin > 0).any()):
        return margin
    scale = logit_scale(model, x)
    near = ((margin > 0) & (margin <= RTOL * scale)).nonzero().flatten()
    if not len(near):
        return margin
    y = torch.as_tensor(y, device=x.device)
    eps_near = eps[near] if isinstance(eps, torch.Tensor) and eps.numel() > 1 else eps
    if isinstance(eps_near, torch.Tensor):
        eps_near = eps_near.double()
    exact = margin_lower_bound(float64_copy(model), x[near].double(), y[near], eps_near, norm=norm,
                               method=method).detach()
    adjusted = exact - RTOL64 * scale[near].double()
    # the cast to float32 keeps the sign of every value this far from 0 (float32 underflows below 1e-45)
    margin = margin.clone()
    margin[near] = adjusted.to(margin.dtype)
    if counts is not None:
        counts["rechecked"] = counts.get("rechecked", 0) + len(near)
        counts["rejected"] = counts.get("rejected", 0) + int((adjusted <= 0).sum())
    return margin


def certified_slack(model: nn.Module, lower: torch.Tensor, upper: torch.Tensor, C: torch.Tensor, b: torch.Tensor, *,
                    method: Union[str, BoundMethod] = "crown") -> torch.Tensor:
    """Lower bounds of ``C @ model(x) - b`` over the box (one input: lower, upper (1, ...); C (1, S, K) and
    b (S,) in float64, as written in the property): > 0 proves the row, also against rounding. Rows
    positive by at most ``RTOL * (1 + |C_row| @ |logits| + |b_row|)`` (logits at the box centre) are
    recomputed in float64 and reduced by the float64 tolerance, as in ``certified_margin``. Returns (S,)
    float64 on the CPU."""
    C64, b64 = C.double(), b.double().cpu()
    rows, _ = box_bounds(model, lower, upper, C=C64.to(lower.dtype), method=method)
    slack = rows[0].detach().double().cpu() - b64
    if not bool((slack > 0).any()):
        return slack
    logits = _clean_outputs(model, (lower + upper) / 2).double().cpu().reshape(-1)
    scale = 1.0 + C64[0].abs().cpu() @ logits.abs() + b64.abs()
    near = (slack > 0) & (slack <= RTOL * scale)
    if bool(near.any()):
        exact, _ = box_bounds(float64_copy(model), lower.double(), upper.double(), C=C64.to(lower.device),
                              method=method)
        slack[near] = exact[0].detach().cpu()[near] - b64[near] - RTOL64 * scale[near]
    return slack
