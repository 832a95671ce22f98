"""The perturbation: which inputs a bound covers. One value, parsed once at the edge and passed on.

A ``Perturbation`` is a norm and a radius per sample (``eps``, (B,)), or an explicit input box. The
L-inf ball is intersected with [0, 1] (pixels); the L2 ball is not (the full ball is a superset, so bounds
over it stay sound). An explicit box (VNNLIB properties, branch and bound on the input) is used as given.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from verifiers.errors import BoundInputError


class Norm(float, enum.Enum):
    """The norms of a perturbation ball. A float: ``Norm.LINF == math.inf`` and ``Norm.L2 == 2.0``."""
    LINF = math.inf
    L2 = 2.0

    def __str__(self) -> str:
        return "inf" if self is Norm.LINF else "2"


def parse_norm(norm: Union[float, int, str, Norm]) -> Norm:
    """``inf`` (or ``"inf"``, ``"linf"``, ``math.inf``) or ``2`` (``"2"``, ``"l2"``, ``2.0``) -> a ``Norm``."""
    if isinstance(norm, Norm):
        return norm
    text = str(norm).strip().lower()
    if text in ("inf", "linf", "l-inf"):
        return Norm.LINF
    if text in ("2", "2.0", "l2"):
        return Norm.L2
    raise BoundInputError(f"unsupported norm {norm!r}; supported norms: inf, 2")


def parse_eps(eps: Union[float, torch.Tensor], batch: int, like: torch.Tensor) -> torch.Tensor:
    """A radius as a (batch,) tensor on ``like``'s device and dtype: a number, a 1-element or a (batch,)
    tensor, finite and >= 0; BoundInputError otherwise."""
    if isinstance(eps, torch.Tensor):
        eps_t = eps.detach().to(device=like.device, dtype=like.dtype).flatten()
        if eps_t.numel() == 1:
            eps_t = eps_t.expand(batch)
        if eps_t.numel() != batch:
            raise BoundInputError(f"eps must be a float or a tensor of shape ({batch},), got shape {tuple(eps.shape)}")
    else:
        try:
            eps_t = torch.full((batch,), float(eps), device=like.device, dtype=like.dtype)
        except (TypeError, ValueError):
            raise BoundInputError(f"eps must be a number, got {eps!r}") from None
    if torch.isnan(eps_t).any():
        raise BoundInputError("eps is NaN")
    if (eps_t < 0).any():
        raise BoundInputError(f"eps must be >= 0, got {eps_t.min().item():g}")
    if torch.isinf(eps_t).any():
        raise BoundInputError("eps must be finite")
    return eps_t


@dataclass(frozen=True)
class Perturbation:
    """Inputs around x: the ``norm`` ball of radius ``eps`` (B,) (L-inf intersected with [0, 1]), or, when
    ``box`` is given, exactly the box ``box[0] <= x' <= box[1]`` (each (B, ...); then ``norm`` is L-inf)."""
    norm: Norm
    eps: torch.Tensor
    box: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    @staticmethod
    def ball(norm: Union[str, float, Norm], eps: Union[float, torch.Tensor], x: torch.Tensor) -> "Perturbation":
        """The ball around ``x`` (B, ...); ``eps`` a number or (B,)."""
        return Perturbation(parse_norm(norm), parse_eps(eps, x.shape[0], x))

    @staticmethod
    def input_box(lower: torch.Tensor, upper: torch.Tensor) -> "Perturbation":
        """Exactly the box ``lower <= x' <= upper`` (each (B, ...), finite, lower <= upper)."""
        if lower.shape != upper.shape or lower.dim() < 2:
            raise BoundInputError(f"lower and upper must be batched tensors of one shape, got {tuple(lower.shape)} "
                                  f"and {tuple(upper.shape)}")
        if not (torch.isfinite(lower).all() and torch.isfinite(upper).all()):
            raise BoundInputError("the input box must be finite")
        if (lower > upper).any():
            raise BoundInputError("the input box is empty: some lower bound exceeds its upper bound")
        radius = ((upper - lower) / 2).flatten(1).max(1).values
        return Perturbation(Norm.LINF, radius, (lower, upper))

    def with_eps(self, eps: torch.Tensor) -> "Perturbation":
        """The same norm at other radii (B,) (not for an explicit box)."""
        if self.box is not None:
            raise BoundInputError("an explicit input box has no radius to change")
        return Perturbation(self.norm, eps)

    def bounding_box(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """An axis-aligned box containing every input of the perturbation (the box itself, the clipped L-inf
        ball, or for L2 the cube of half-width eps, which contains the ball)."""
        if self.box is not None:
            return self.box
        radius = self.eps.view(-1, *([1] * (x.dim() - 1)))
        if self.norm is Norm.LINF:
            return (x - radius).clamp(0.0, 1.0), (x + radius).clamp(0.0, 1.0)
        return x - radius, x + radius

    def minimum(self, A: torch.Tensor, bias: torch.Tensor, x: torch.Tensor,
                eps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``min of A . x' + bias`` over the perturbation (at radii ``eps`` (B,) when given, default its own):
        A (B, S, *input shape), bias (B, S) -> (B, S). Exact for the box and the L-inf ball; for L2 the
        minimum over the whole ball (``A . x + bias - eps ||A||_2``)."""
        if eps is None:
            eps = self.eps
        if self.norm is Norm.L2 and self.box is None:
            flat = A.flatten(2)
            centre = (flat @ x.flatten(1).unsqueeze(2)).squeeze(2)
            return centre + bias - eps.view(-1, 1) * flat.norm(dim=2)
        lower, upper = self.box if self.box is not None else Perturbation(self.norm, eps).bounding_box(x)
        flat = A.flatten(2)
        centre = ((lower + upper) / 2).flatten(1).unsqueeze(2)
        half = ((upper - lower) / 2).flatten(1).unsqueeze(2)
        return (flat @ centre).squeeze(2) - (flat.abs() @ half).squeeze(2) + bias
