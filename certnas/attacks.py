"""White-box attacks: construct with settings, call with ``(images, labels)``, get adversarial
images back, always inside the eps ball and inside [0, 1].

FGSM and PGD (L-inf and L2) and the C&W-loss PGD are this project's own code; AutoAttack (standard
version: APGD-CE, APGD-T, FAB-T, Square) comes from ``pyautoattack``. Inputs are pixels in [0, 1].
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, replace
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from verifiers.bounds import parse_norm


def _view(eps: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return eps.view(-1, *([1] * (x.dim() - 1)))


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: torch.Tensor, norm: float) -> torch.Tensor:
    """Nearest point of the ball (radius eps, per sample) intersected with [0, 1]."""
    delta = x_adv - x
    if norm == math.inf:
        delta = torch.max(torch.min(delta, _view(eps, x)), -_view(eps, x))
    else:
        norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        delta = delta * _view((eps / norms).clamp(max=1.0), x)
    return (x + delta).clamp(0.0, 1.0)


def _loss(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if kind == "ce":
        return lambda logits, y: F.cross_entropy(logits, y, reduction="none")
    if kind == "cw":  # margin loss: best other logit minus the true logit
        def cw(logits, y):
            true = logits.gather(1, y.view(-1, 1)).squeeze(1)
            other = logits.scatter(1, y.view(-1, 1), -math.inf).max(dim=1).values
            return other - true
        return cw
    raise ValueError(f"unknown attack loss {kind!r}; known: ce, cw")


@dataclass
class PGD:
    """Projected gradient ascent on the loss, random start, ``restarts`` tries keeping the best.

    eps: radius in pixels, a float or a (B,) tensor of per-sample radii; norm: inf or 2; steps;
    step_size (default 2.5 * eps / steps, per sample); loss: ce or cw.
    ``steps=1, random_start=False, step_size=eps`` is FGSM. seed: None draws the random starts from
    torch's global generator; an int draws each sample's from its own generator, seeded by the seed and
    the sample's pixels, so an attack's result on a sample does not depend on the batch it is in
    (verification split over processes merges exactly). batch_size: samples attacked at once (0: all);
    with a seed the result does not depend on it (up to rounding).
    """
    model: nn.Module
    eps: Union[float, torch.Tensor]
    norm: float = math.inf
    steps: int = 10
    step_size: float = None
    restarts: int = 1
    random_start: bool = True
    loss: str = "ce"
    seed: Optional[int] = None
    batch_size: int = 0

    def __post_init__(self):
        self.norm = parse_norm(self.norm)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss_fn = _loss(self.loss)
        eps = torch.as_tensor(self.eps, device=x.device, dtype=x.dtype).expand(x.shape[0]).clone()
        step_size = 2.5 * eps / max(self.steps, 1) if self.step_size is None else \
            torch.as_tensor(self.step_size, device=x.device, dtype=x.dtype).expand(x.shape[0])
        if 0 < self.batch_size < x.shape[0]:
            return torch.cat([replace(self, eps=eps[i:i + self.batch_size], step_size=step_size[i:i + self.batch_size],
                                      batch_size=0)(x[i:i + self.batch_size], y[i:i + self.batch_size])
                              for i in range(0, x.shape[0], self.batch_size)])
        best = x.detach().clone()
        best_loss = torch.full((x.shape[0],), -math.inf, device=x.device)
        was_training = self.model.training
        self.model.eval()
        try:
            for restart in range(max(self.restarts, 1)):
                x_adv = x.detach().clone()
                if self.random_start and bool((eps > 0).any()):
                    uniform, gaussian, scale = self._random_start(x, restart)
                    if self.norm == math.inf:
                        x_adv = x_adv + (uniform * 2 - 1) * _view(eps, x)
                    else:
                        noise = gaussian / _view(gaussian.flatten(1).norm(dim=1).clamp_min(1e-12), x)
                        x_adv = x_adv + noise * _view(eps * scale, x)
                    x_adv = project(x_adv, x, eps, self.norm)
                for _ in range(self.steps):
                    x_adv.requires_grad_(True)
                    with torch.enable_grad():
                        loss = loss_fn(self.model(x_adv), y)
                        grad, = torch.autograd.grad(loss.sum(), x_adv)
                    with torch.no_grad():
                        if self.norm == math.inf:
                            step = grad.sign()
                        else:
                            step = grad / _view(grad.flatten(1).norm(dim=1).clamp_min(1e-12), x)
                        x_adv = project(x_adv + _view(step_size, x) * step, x, eps, self.norm)
                with torch.no_grad():
                    final = loss_fn(self.model(x_adv), y)
                    better = final > best_loss
                    best[better] = x_adv[better]
                    best_loss = torch.where(better, final, best_loss)
        finally:
            self.model.train(was_training)
        return best.detach()

    def _random_start(self, x: torch.Tensor, restart: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Uniform and Gaussian noise shaped like x and a (B,) uniform: from the global generator, or
        with ``seed`` from one generator per sample seeded by the seed, the restart and the pixels."""
        if self.seed is None:
            if self.norm == math.inf:
                return torch.rand_like(x), x, x
            return x, torch.randn_like(x), torch.rand(x.shape[0], device=x.device)
        uniform, gaussian, scale = [], [], []
        for sample in x.detach().cpu().contiguous():
            key = zlib.crc32(sample.numpy().tobytes())
            g = torch.Generator().manual_seed((self.seed * 1000003 + restart * 7919 + key) % (2 ** 63))
            uniform.append(torch.rand(sample.shape, generator=g, dtype=x.dtype))
            gaussian.append(torch.randn(sample.shape, generator=g, dtype=x.dtype))
            scale.append(torch.rand((), generator=g, dtype=x.dtype))
        return (torch.stack(uniform).to(x.device), torch.stack(gaussian).to(x.device),
                torch.stack(scale).to(x.device))


def fgsm(model: nn.Module, eps: float, norm=math.inf) -> PGD:
    return PGD(model, eps, norm, steps=1, step_size=eps, random_start=False)


@dataclass
class AutoAttackAdapter:
    """AutoAttack (``pyautoattack``) behind the same call shape as ``PGD``. version ``standard``
    (APGD-CE, APGD-T, FAB-T, Square with 5,000 queries), or ``fast``: APGD-CE and APGD-T only (the
    Square attack alone costs 5,000 sequential forward passes, minutes per model on a CPU)."""
    model: nn.Module
    eps: float
    norm: float = math.inf
    seed: int = 0
    version: str = "standard"

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        import logging
        from pyautoattack import AutoAttack
        norm = parse_norm(self.norm)
        if self.eps == 0:
            return x.detach().clone()
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            classes = int(self.model(x[:1]).shape[1])
        if classes < 4:
            from certnas.errors import CertnasError
            raise CertnasError(f"AutoAttack's targeted attacks need at least 4 classes; the model has {classes}")
        logging.getLogger("auto-attack").setLevel(logging.WARNING)
        try:
            norm_name = "Linf" if norm == math.inf else "L2"
            if self.version == "fast":
                attack = AutoAttack(self.model, eps=float(self.eps), norm=norm_name, seed=self.seed,
                                    version="custom", attacks=["apgd-ce", "apgd-t"], device=x.device)
            else:
                attack = AutoAttack(self.model, eps=float(self.eps), norm=norm_name, seed=self.seed,
                                    version=self.version, device=x.device)
            # the standard version targets 9 classes, which needs 10; fewer classes: all other classes
            attack.apgd_targeted.n_target_classes = min(9, classes - 1)
            attack.fab.n_target_classes = min(9, classes - 1)
            attack.verbose = False
            x_adv, _ = attack.run_standard_evaluation(x.detach(), y, batch_size=max(len(x), 1))
        finally:
            self.model.train(was_training)
        # AutoAttack's own projection is float-exact up to rounding; enforce the ball and the box.
        eps = torch.full((x.shape[0],), float(self.eps), device=x.device, dtype=x.dtype)
        return project(x_adv.to(x.device, x.dtype), x, eps, norm).detach()


ATTACKS: Dict[str, Callable[..., PGD]] = {
    "fgsm": lambda model, eps, norm=math.inf, steps=1, restarts=1: fgsm(model, eps, norm),
    "pgd": lambda model, eps, norm=math.inf, steps=10, restarts=1: PGD(model, eps, norm, steps, restarts=restarts),
    "cw": lambda model, eps, norm=math.inf, steps=10, restarts=1: PGD(model, eps, norm, steps, restarts=restarts, loss="cw"),
    "autoattack": lambda model, eps, norm=math.inf, steps=0, restarts=1, version="standard":
        AutoAttackAdapter(model, eps, norm, version=version),
}
