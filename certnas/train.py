"""Final training of a network: standard, PGD adversarial, IBP or CROWN-IBP certified training.

The robust modes follow the usual schedule: ``warmup_epochs`` of clean training (eps = 0), then eps
grows linearly per batch to its target over ``ramp_epochs`` and stays there. Certified losses
(Gowal et al. 2018; Zhang et al. 2020):

- ibp: ``kappa * CE(f(x), y) + (1 - kappa) * CE(-m_ibp, y)``, kappa from 1 to ``kappa_end`` over
  the ramp, where ``m`` are lower bounds on the margins ``f_y - f_j``.
- crown-ibp: as ibp with ``m = beta * m_crown_ibp + (1 - beta) * m_ibp``, beta from ``beta_start``
  to ``beta_end`` over the ramp (only the bounds with non-zero weight are computed).
- pgd: ``CE(f(x_adv), y)`` with x_adv from PGD at the scheduled eps.

The training set is the search's train + validation splits (DARTS trains the final network on all
of its training data); accuracy is reported on the test split.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import ConcatDataset

from certnas.attacks import PGD
from certnas.config import ConfigError
from certnas.data import DataInfo
from certnas.io import save_model
from certnas.runs import atomic_write_json, collate, environment, epoch_batches, run_epochs, start_run
from certnas.space.genotype import NAMED, Genotype, GenotypeError
from certnas.space.network import STEMS, NetworkConfig, build_network

MODES = ("standard", "pgd", "ibp", "crown-ibp")
NETWORKS = ("darts", "mlp")


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run. Defaults: the embedded-MNIST CPU setting (README); the
    paper's final network is layers=20, init_channels=36, epochs=600, auxiliary, drop_path=0.2."""
    data: str = "mnist-embedded"
    data_root: Optional[str] = None
    image_size: int = 32
    network: str = "darts"
    genotype: str = "PC_DARTS"
    layers: int = 4
    init_channels: int = 8
    auxiliary: bool = False
    stem: str = "cifar"
    auxiliary_weight: float = 0.4
    drop_path: float = 0.0
    hidden: Tuple[int, ...] = (128, 128)
    mode: str = "standard"
    eps: float = 0.1
    norm: str = "inf"
    pgd_steps: int = 7
    warmup_epochs: int = 1
    ramp_epochs: int = 2
    kappa_end: float = 0.5
    beta_start: float = 1.0
    beta_end: float = 0.0
    epochs: int = 5
    batch_size: int = 64
    train_limit: int = 0
    eval_limit: int = 1000
    lr: float = 0.025
    lr_min: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    seed: int = 0
    device: str = "cpu"

    def validate(self) -> "TrainConfig":
        if self.mode not in MODES:
            raise ConfigError(f"unknown mode {self.mode!r}; known: {', '.join(MODES)}")
        if self.network not in NETWORKS:
            raise ConfigError(f"unknown network {self.network!r}; known: {', '.join(NETWORKS)}")
        for name in ("layers", "init_channels", "epochs", "batch_size", "pgd_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eps < 0 or self.warmup_epochs < 0 or self.ramp_epochs < 0:
            raise ConfigError("eps, warmup_epochs and ramp_epochs must be >= 0")
        if not 0 <= self.drop_path < 1:
            raise ConfigError(f"drop_path must lie in [0, 1), got {self.drop_path}")
        if self.mode in ("ibp", "crown-ibp") and self.drop_path > 0:
            raise ConfigError("drop-path makes the network random, so its bounds would not hold: "
                              "use --drop-path 0 with --mode ibp / crown-ibp")
        if self.stem not in STEMS:
            raise ConfigError(f"unknown stem {self.stem!r}; known: {', '.join(STEMS)}")
        if self.network == "mlp" and (not self.hidden or min(self.hidden) < 1):
            raise ConfigError(f"--hidden must list positive widths, got {self.hidden}")
        return self


def resolve_genotype(text: str) -> Genotype:
    """A published genotype by name (DARTS_V1, DARTS_V2, PC_DARTS) or a genotype.json file."""
    if text in NAMED:
        return NAMED[text]
    path = Path(text)
    if not path.is_file():
        raise GenotypeError(f"--genotype {text!r}: neither a file nor a known name ({', '.join(NAMED)})")
    return Genotype.from_json(path.read_text())


def network_config(config: TrainConfig, info: DataInfo) -> NetworkConfig:
    genotype = resolve_genotype(config.genotype).to_dict() if config.network == "darts" else None
    return NetworkConfig(kind=config.network, in_channels=info.in_channels, image_size=info.image_size,
                         num_classes=info.num_classes, mean=tuple(info.mean), std=tuple(info.std), genotype=genotype,
                         layers=config.layers, init_channels=config.init_channels, auxiliary=config.auxiliary,
                         hidden=tuple(config.hidden), stem=config.stem)


def schedule(config: TrainConfig, step: int, steps_per_epoch: int) -> Dict[str, float]:
    """eps, kappa and beta at global batch ``step``: 0 during warm-up, then a linear ramp."""
    if config.mode == "standard":
        return {"eps": 0.0, "kappa": 1.0, "beta": config.beta_start}
    start = config.warmup_epochs * steps_per_epoch
    length = config.ramp_epochs * steps_per_epoch
    progress = 1.0 if length == 0 else min(max((step - start + 1) / length, 0.0), 1.0)
    if step < start:
        progress = 0.0
    return {"eps": config.eps * progress, "kappa": 1.0 - (1.0 - config.kappa_end) * progress,
            "beta": config.beta_start + (config.beta_end - config.beta_start) * progress}


def certified_margins(model: nn.Module, x, y, eps: float, norm: str, mode: str, beta: float) -> torch.Tensor:
    """(B, K) margin lower bounds of the training mode (beta mixes CROWN-IBP with IBP)."""
    from verifiers.bounds import margin_lower_bounds
    if mode == "ibp" or beta <= 0:
        return margin_lower_bounds(model, x, y, eps, norm=norm, method="ibp")
    crown_ibp = margin_lower_bounds(model, x, y, eps, norm=norm, method="crown-ibp")
    if beta >= 1:
        return crown_ibp
    return beta * crown_ibp + (1 - beta) * margin_lower_bounds(model, x, y, eps, norm=norm, method="ibp")


class Trainer:
    """The network, optimiser and the loss of one training mode."""

    def __init__(self, config: TrainConfig, network: NetworkConfig):
        self.config = config
        self.device = torch.device(config.device)
        self.model = build_network(network).to(self.device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), config.lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, config.epochs, eta_min=config.lr_min)

    def loss(self, x: torch.Tensor, y: torch.Tensor, plan: Dict[str, float]) -> Tuple[torch.Tensor, Dict[str, float]]:
        config, model = self.config, self.model
        details: Dict[str, float] = {}
        if config.mode == "pgd" and plan["eps"] > 0:
            x = PGD(model, plan["eps"], config.norm, steps=config.pgd_steps)(x, y)
        if hasattr(model, "forward_with_aux"):
            logits, aux = model.forward_with_aux(x)
        else:
            logits, aux = model(x), None
        loss = F.cross_entropy(logits, y)
        if aux is not None:
            loss = loss + config.auxiliary_weight * F.cross_entropy(aux, y)
        if config.mode in ("ibp", "crown-ibp") and plan["eps"] > 0:
            margins = certified_margins(model, x, y, plan["eps"], config.norm, config.mode, plan["beta"])
            robust = F.cross_entropy(-margins, y)
            loss = plan["kappa"] * loss + (1 - plan["kappa"]) * robust
            details = {"robust_loss": robust.item(), "train_verified": (margins.topk(2, dim=1, largest=False).values[:, 1] > 0)
                       .float().mean().item()}
        details.update({"train_loss": loss.item(), "train_acc": (logits.argmax(1) == y).float().mean().item()})
        return loss, details

    def step(self, x, y, plan) -> Dict[str, float]:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss, details = self.loss(x, y, plan)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        return details


@torch.no_grad()
def topk_accuracies(model: nn.Module, dataset, device, limit: int = 0, batch_size: int = 256,
                    ks: Tuple[int, ...] = (1,)) -> Dict[int, float]:
    """Top-k accuracy for each k in ``ks`` (eval mode, one pass) on the first ``limit`` samples (0: all)."""
    was_training = model.training
    model.eval()
    count = min(len(dataset), limit or len(dataset))
    correct = dict.fromkeys(ks, 0)
    with torch.no_grad():
        for start in range(0, count, batch_size):
            x, y = collate(dataset, torch.arange(start, min(start + batch_size, count)), device)
            hits = model(x).topk(max(ks), dim=1).indices == y[:, None]
            for k in ks:
                correct[k] += hits[:, :k].any(1).sum().item()
    model.train(was_training)
    return {k: c / max(count, 1) for k, c in correct.items()}


def accuracy(model: nn.Module, dataset, device, limit: int = 0, batch_size: int = 256) -> float:
    """Top-1 accuracy (eval mode) on the first ``limit`` samples of ``dataset`` (0: all)."""
    return topk_accuracies(model, dataset, device, limit, batch_size)[1]


def train(config: TrainConfig, out: Path, *, resume: bool = False, force: bool = False, quiet: bool = False) -> Dict[str, Any]:
    """Train into ``out`` (checkpoint.pt each epoch, history.csv, model.pt at the end); returns the
    summary also written to ``summary.json``."""
    out, splits = start_run(config, out, resume=resume, force=force)
    network = network_config(config, splits.info)
    trainer = Trainer(config, network)
    train_set = ConcatDataset([splits.train, splits.val])
    count = min(len(train_set), config.train_limit or len(train_set))
    steps_per_epoch = math.ceil(count / config.batch_size)

    def epoch_fn(epoch: int, progress) -> Dict[str, float]:
        if hasattr(trainer.model, "drop_path_prob"):
            trainer.model.drop_path_prob = config.drop_path * epoch / config.epochs
        sums: Dict[str, float] = {}
        order = epoch_batches(train_set, config.batch_size, config.seed, epoch, config.train_limit)
        for index, batch in enumerate(order):
            plan = schedule(config, epoch * steps_per_epoch + index, steps_per_epoch)
            x, y = collate(train_set, batch, trainer.device)
            row = trainer.step(x, y, plan)
            for key, value in row.items():
                sums[key] = sums.get(key, 0.0) + value
            progress.set_postfix(loss=f"{row['train_loss']:.3f}", acc=f"{row['train_acc']:.2f}", eps=f"{plan['eps']:.3g}")
            progress.update()
        trainer.scheduler.step()
        means = {key: round(value / len(order), 6) for key, value in sums.items()}
        means["eps"] = round(plan["eps"], 6)
        means["lr"] = trainer.optimizer.param_groups[0]["lr"]
        means["test_acc"] = round(accuracy(trainer.model, splits.test, trainer.device, config.eval_limit), 6)
        return means

    state = {"model": trainer.model, "optimizer": trainer.optimizer, "scheduler": trainer.scheduler}
    history = run_epochs(out=out, epochs=config.epochs, state=state, resume=resume, epoch_fn=epoch_fn,
                         batches_per_epoch=steps_per_epoch, description=f"train ({config.mode})", quiet=quiet)
    trainer.model.eval()
    top = topk_accuracies(trainer.model, splits.test, trainer.device, config.eval_limit,
                          ks=(1, 5) if network.num_classes > 5 else (1,))
    summary = {"test_acc": top[1], **({"test_top5_acc": top[5]} if 5 in top else {}),
               "test_samples": min(len(splits.test), config.eval_limit or len(splits.test)),
               "epochs_completed": len(history), "train_seconds": round(sum(r["seconds"] for r in history), 2),
               "parameters": sum(p.numel() for p in trainer.model.parameters())}
    save_model(trainer.model, out / "model.pt", network=network.to_dict(), dataset=asdict(splits.info),
               training=asdict(config), summary=summary, versions=environment())
    atomic_write_json(out / "summary.json", {**summary, "settings": asdict(config), "network": network.to_dict()})
    return summary
