"""Searches for inputs that break a claimed bound, without trusting the bound code."""
from __future__ import annotations

import math

import torch


def project(x: torch.Tensor, centre: torch.Tensor, eps: torch.Tensor, norm: float) -> torch.Tensor:
    """Project onto the ball of radius eps (per sample, shape (B,)) around centre; L-inf also onto [0, 1]."""
    view = (-1,) + (1,) * (x.dim() - 1)
    delta = x - centre
    if norm == math.inf:
        delta = torch.max(torch.min(delta, eps.view(view)), -eps.view(view))
        return (centre + delta).clamp(0, 1)
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    return centre + delta * (eps / norms).clamp(max=1.0).view(view)


def random_points(centre: torch.Tensor, eps: torch.Tensor, norm: float, count: int, generator=None) -> torch.Tensor:
    """(count, B, ...) points in the ball: half on the boundary (corners for L-inf), half inside."""
    shape = (count,) + tuple(centre.shape)
    if norm == math.inf:
        sign = torch.randint(0, 2, shape, generator=generator).to(centre) * 2 - 1
        scale = torch.ones(shape).to(centre)
        scale[count // 2:] = torch.rand((count - count // 2,) + tuple(centre.shape), generator=generator).to(centre)
        delta = sign * scale * eps.view(1, -1, *([1] * (centre.dim() - 1)))
        return (centre + delta).clamp(0, 1)
    direction = torch.randn(shape, generator=generator).to(centre)
    direction = direction / direction.flatten(2).norm(dim=2).view(count, -1, *([1] * (centre.dim() - 1)))
    radius = torch.ones(count, centre.shape[0]).to(centre)
    radius[count // 2:] = torch.rand(count - count // 2, centre.shape[0], generator=generator).to(centre)
    return centre + direction * (radius * eps).view(count, -1, *([1] * (centre.dim() - 1)))


def ascent_step(x: torch.Tensor, grad: torch.Tensor, step: torch.Tensor, norm: float) -> torch.Tensor:
    """One steepest-ascent step of per-sample length ``step`` (B,): the gradient's sign for L-inf, its
    direction for L2."""
    view = (-1,) + (1,) * (x.dim() - 1)
    if norm == math.inf:
        return x + step.view(view) * grad.sign()
    return x + step.view(view) * grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(view)


def max_violation(model, centre, eps, norm, lower, upper, *, samples=64, pgd_steps=30, seed=0) -> float:
    """Largest amount by which any found output leaves [lower, upper] (0 if none does).

    Random points and a PGD search that, for every sample, logit and side, maximises that
    logit's violation of its own bound (signed sign-gradient steps for L-inf, normalised for L2).
    """
    generator = torch.Generator().manual_seed(seed)
    eps = torch.as_tensor(eps, dtype=centre.dtype).expand(centre.shape[0]).clone()
    worst = 0.0
    with torch.no_grad():
        points = random_points(centre, eps, norm, samples, generator)
        outputs = model(points.flatten(0, 1)).view(samples, centre.shape[0], -1)
        worst = max(worst, (lower - outputs).max().item(), (outputs - upper).max().item())
    batch, classes = lower.shape
    # One copy of each sample per (logit, side): objective = violation of that bound.
    centre_rep = centre.repeat_interleave(2 * classes, dim=0)
    eps_rep = eps.repeat_interleave(2 * classes)
    logit = torch.arange(classes).repeat(2).repeat(batch)
    side = torch.cat([torch.full((classes,), -1.0), torch.full((classes,), 1.0)]).repeat(batch)
    bound = torch.stack([lower, upper], dim=1).reshape(batch, -1).flatten()
    x = project(centre_rep + 0.001 * torch.randn(centre_rep.shape, generator=generator), centre_rep, eps_rep, norm)
    step = 2.5 * eps_rep / pgd_steps
    for _ in range(pgd_steps):
        x = x.detach().requires_grad_(True)
        out = model(x).gather(1, logit.view(-1, 1)).squeeze(1)
        violation = side * (out - bound)  # > 0 means the bound is broken
        worst = max(worst, violation.max().item())
        grad, = torch.autograd.grad(violation.sum(), x)
        x = project(ascent_step(x, grad, step, norm), centre_rep, eps_rep, norm)
    with torch.no_grad():
        out = model(x).gather(1, logit.view(-1, 1)).squeeze(1)
        worst = max(worst, (side * (out - bound)).max().item())
    return worst


def pgd_attack(model, x, y, eps, norm=math.inf, *, steps: int = 40, restarts: int = 2, seed: int = 0) -> torch.Tensor:
    """A plain PGD on the cross entropy (the tests' own falsifier, independent of certnas): per sample,
    the point of a restart that is misclassified, else x itself. eps: float or (B,)."""
    generator = torch.Generator().manual_seed(seed)
    eps = torch.as_tensor(eps, dtype=x.dtype).expand(x.shape[0]).clone()
    view = (-1,) + (1,) * (x.dim() - 1)
    best = x.clone()
    with torch.enable_grad():  # callers may be inside no_grad
        return _pgd_restarts(model, x, y, eps, norm, steps, restarts, generator, view, best)


def _pgd_restarts(model, x, y, eps, norm, steps, restarts, generator, view, best):
    for _ in range(restarts):
        adv = project(x + (torch.rand(x.shape, generator=generator) * 2 - 1) * eps.view(view) * 0.5, x, eps, norm)
        step = 2.5 * eps / steps
        for _ in range(steps):
            adv = adv.detach().requires_grad_(True)
            loss = torch.nn.functional.cross_entropy(model(adv), y, reduction="sum")
            grad, = torch.autograd.grad(loss, adv)
            adv = project(ascent_step(adv, grad, step, norm), x, eps, norm)
        with torch.no_grad():
            wrong = model(adv).argmax(1) != y
        best[wrong] = adv.detach()[wrong]
    return best
