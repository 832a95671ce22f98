"""Robustness metrics R for the architecture loss ``L_val - gamma * R``, chosen by name.

Every metric returns ``(value, details)``: a scalar tensor with a graph to the architecture
parameters, and a dict of floats for ``history.csv``. Inputs x: (B, C, H, W) in [0, 1].
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Tuple, Union

import torch
import torch.nn as nn

from verifiers.bounds import margin_lower_bound, parse_norm
from verifiers.radius import certified_radius

Details = Dict[str, float]


@dataclass(frozen=True)
class MetricConfig:
    """eps in pixel units; norm inf or 2; bound ibp | crown-ibp | crown; clb_form margin | radius;
    jacobian_projections 0 = exact (K backward passes), M > 0 = M random classes per batch;
    radius form: certified radius by log-space bisection on [radius_min, radius_max] (0 below radius_min);
    clb_scale: ``linear`` (the paper: the mean margin bound itself) or ``log`` (the mean of
    sign(m) * log(1 + |m|), monotone in each margin bound m). On a supernet with affine-free batch
    norm the margin bounds reach -1e14 early in search, so the linear form swamps L_val at
    gamma = 0.01; the log form keeps the two comparable."""
    eps: float = 0.01
    norm: str = "inf"
    bound: str = "crown-ibp"
    clb_form: str = "margin"
    jacobian_projections: int = 0
    radius_max: float = 0.3
    radius_steps: int = 8
    radius_min: float = 1e-6
    clb_scale: str = "log"


def metric_none(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: MetricConfig) -> Tuple[torch.Tensor, Details]:
    return torch.zeros((), device=x.device), {}


def metric_clb(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: MetricConfig) -> Tuple[torch.Tensor, Details]:
    """Certified lower bound. ``margin``: batch mean of the margin lower bound at eps.
    ``radius``: batch mean of the per-sample certified radius, with the implicit-function gradient
    d eps*/d theta = -(dg/d theta) / (dg/d eps) at g(eps*, theta) = 0, g the margin lower bound."""
    if config.clb_form == "margin":
        margin = clb_margins(model, x, y, config)
        details = {"clb_margin": margin.mean().item(), "clb_certified": (margin > 0).float().mean().item()}
        return _scale(margin, config.clb_scale).mean(), details
    if config.clb_form != "radius":
        raise ValueError(f"unknown clb form {config.clb_form!r}; known: margin, radius")
    return radius_objective(model, x, y, config)


def clb_margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: MetricConfig) -> torch.Tensor:
    """(B,) lower bounds on ``min_{j != y} f_y - f_j`` at ``config.eps``, with their graph. L-inf IBP and
    CROWN-IBP run on the plain-PyTorch engine of ``verifiers.interval`` (tested against auto_LiRPA, at a
    fraction of the cost; crown-ibp takes the larger of the CROWN-IBP and IBP bound per row); other norms
    and methods on auto_LiRPA."""
    if parse_norm(config.norm) == math.inf and config.bound in ("ibp", "crown-ibp"):
        from verifiers.interval import interval_margins
        crown = config.bound == "crown-ibp"
        bounds = interval_margins(model, x, y, config.eps, crown_ibp=crown)
        # per row, the larger of two sound lower bounds is sound
        margins = torch.maximum(bounds.crown_ibp, bounds.ibp) if crown else bounds.ibp
        return margins.scatter(1, y[:, None], float("inf")).min(1).values
    return margin_lower_bound(model, x, y, config.eps, norm=config.norm, method=config.bound)


def _scale(margin: torch.Tensor, scale: str) -> torch.Tensor:
    if scale == "linear":
        return margin
    if scale == "log":
        return torch.sign(margin) * torch.log1p(margin.abs())
    raise ValueError(f"unknown clb scale {scale!r}; known: log, linear")


# Smallest finite-difference step of the radius form's slope, in pixel units: about 170 float32 spacings of
# a pixel near 1 (6e-8), so rounding the ball's corners moves the slope by under 1%.
SLOPE_STEP = 1e-5


def radius_objective(model, x, y, config: MetricConfig) -> Tuple[torch.Tensor, Details]:
    # Log-space bisection from radius_min: on [0, radius_max] in 8 linear steps anything below 0.3 / 256
    # came out as 0, with no gradient, which is where a supernet's radii are for most of a search.
    radius = certified_radius(model, x, y, norm=config.norm, method=config.bound,
                              eps_max=config.radius_max, steps=config.radius_steps, eps_min=config.radius_min)
    inner = (radius > 0) & (radius < config.radius_max)
    details = {"clb_radius": radius.mean().item(), "clb_certified": (radius > 0).float().mean().item()}
    if not inner.any():
        return radius.mean() + 0.0 * sum(p.sum() for p in model.parameters() if p.requires_grad), details
    index = inner.nonzero().flatten()
    at = radius[index]

    def margins(eps_inner: torch.Tensor) -> torch.Tensor:
        # the whole batch at per-sample eps (0 outside ``inner``): a training-mode supernet's batch norm
        # takes the batch's statistics, and its radii were found on the whole batch (certified_radius);
        # bounding the ``inner`` rows alone bounds another function (in a search's trace, one row alone
        # had a margin bound of -6.8 at a radius the bisection had certified).
        eps = torch.zeros_like(radius).index_put((index,), eps_inner)
        return margin_lower_bound(model, x, y, eps, norm=config.norm, method=config.bound)[index]

    g = margins(at)
    # dg/d eps by a central difference (works for every norm and method; no gradient needed), its step
    # at least SLOPE_STEP: a step of 1e-3 * radius alone is below float32's pixel spacing at radii near
    # 1e-6, where the difference measured rounding (in a search's trace: 4x too steep to 38x too flat).
    h = torch.clamp(1e-3 * at, min=SLOPE_STEP)
    up, down = at + h, (at - h).clamp_min(0)
    with torch.no_grad():
        slope = ((margins(up) - margins(down)) / (up - down)).clamp(max=-1e-6)  # g decreases in eps
    implicit = radius.clone()
    implicit[index] = at - (g - g.detach()) / slope  # value = radius; gradient = -(dg/dtheta) / slope
    return implicit.mean(), details


def input_gradient_norms(model: nn.Module, x: torch.Tensor,
                         classes: Union[torch.Tensor, Callable[[int], torch.Tensor]], dual: float) -> torch.Tensor:
    """(B, len(classes)) q-norms of d logit_k / d x, with a graph for double backprop. ``classes``: the
    class indices, or a function of the number of classes returning them (called after the forward pass,
    which tells it the number without a pass of its own)."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    if callable(classes):
        classes = classes(logits.shape[1])
    norms = []
    for k in classes.tolist():
        grad, = torch.autograd.grad(logits[:, k].sum(), x, create_graph=True)
        norms.append(grad.flatten(1).norm(p=dual, dim=1))
    return torch.stack(norms, dim=1)


def metric_jacobian(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: MetricConfig) -> Tuple[torch.Tensor, Details]:
    """R = -eps * mean_x (1/K) sum_k ||d f_k / d x||_q, q the dual norm of the perturbation norm
    (q = 1 for L-inf, 2 for L2). With M projections, the mean over k uses M random classes
    (an unbiased estimate at M backward passes instead of K)."""
    norm = parse_norm(config.norm)
    dual = 1.0 if norm == math.inf else 2.0

    def choose(num_classes: int) -> torch.Tensor:
        if config.jacobian_projections and config.jacobian_projections < num_classes:
            return torch.randperm(num_classes)[:config.jacobian_projections]
        return torch.arange(num_classes)
    mean_norm = input_gradient_norms(model, x, choose, dual).mean()
    value = -config.eps * mean_norm
    return value, {"jacobian_norm": mean_norm.item(), "jacobian_term": value.item()}


def metric_combined(model, x, y, config: MetricConfig) -> Tuple[torch.Tensor, Details]:
    clb, clb_details = metric_clb(model, x, y, config)
    jac, jac_details = metric_jacobian(model, x, y, config)
    return clb + jac, {**clb_details, **jac_details}


METRICS: Dict[str, Callable[..., Tuple[torch.Tensor, Details]]] = {
    "none": metric_none,
    "clb": metric_clb,
    "jacobian": metric_jacobian,
    "combined": metric_combined,
}


def robustness(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               config: MetricConfig) -> Tuple[torch.Tensor, Details]:
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRICS)}")
    return METRICS[name](model, x, y, config)
