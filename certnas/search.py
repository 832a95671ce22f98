"""The bi-level architecture search (DARTS / PC-DARTS) with a robustness term.

Per batch: an architecture step on a validation batch minimising ``L_val - gamma * R`` (first
order, or second order with the unrolled weights and a finite-difference Hessian-vector product),
then a weight step on a training batch. Baselines: ``none`` (plain DARTS, R = 0), ``sdarts-adv``
(the weight step sees architecture weights perturbed adversarially within an L-inf ball, after
SDARTS-ADV), ``pgd`` (both steps on PGD adversarial examples).
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from certnas.attacks import PGD
from certnas.config import (ConfigError, check_choices, data_root_setting, data_setting, device_setting, eps_setting, norm_setting,
                            seed_setting, setting)
from certnas.metrics import METRICS, MetricConfig, robustness
from certnas.files import atomic_write_json, environment
from certnas.runs import collate, epoch_batches, run_epochs, start_run
from certnas.space.network import STEMS
from certnas.space.supernet import SearchNetwork
from certnas.distributed import World, synchronise_batch_norm
from certnas.train import (TrainConfig, TrainingDivergedError, check_even_reductions, ibp_initialise, make_optimizer,
                           schedule, training_loss)

log = logging.getLogger(__name__)

TERMS = tuple(METRICS)  # the robustness term R of the architecture loss
STRATEGIES = ("darts", "sdarts-adv", "pgd")  # how the search trains: DARTS, or the baselines' adversarial forms
SEARCH_METRICS = TERMS + STRATEGIES[1:]  # --metric, the one-word form of both


def split_metric(metric: str) -> Tuple[str, str]:
    """``--metric NAME`` as ``(term, strategy)``: a robustness term searched the DARTS way, or a baseline
    strategy (SDARTS-ADV, PGD search) without a term."""
    if metric in TERMS:
        return metric, "darts"
    if metric in STRATEGIES:
        return "none", metric
    raise ConfigError(f"unknown metric {metric!r}; known: {', '.join(SEARCH_METRICS)}")
WEIGHT_MODES = ("auto", "standard", "ibp", "crown-ibp")  # certnas.cli lists the same
A_LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class SearchConfig:
    """Every setting of a search. The defaults are the embedded-MNIST CPU setting (see README);
    the paper's setting is layers=8, init_channels=16, epochs=50, stem=cifar on the full dataset.

    ``term``: the robustness term R maximised by the architecture step (none, clb, jacobian, combined);
    ``strategy``: darts, or a baseline's adversarial form (sdarts-adv perturbs the architecture weights in
    the weight step, pgd trains and validates on PGD examples); ``--metric`` names both in one word.
    ``weight_mode``: how the weight step trains the supernet: ``standard`` (DARTS: cross entropy),
    ``ibp`` or ``crown-ibp`` (the certified training of ``certnas train``: ``warmup_epochs`` clean, then
    eps ramped to ``weight_eps`` over ``ramp_epochs``), ``auto``: ibp for the clb and combined terms
    with the darts strategy (a margin bound of an untrained supernet is -1e14 and says nothing), standard otherwise.
    ``w_optimizer`` / ``w_lr``: ``auto`` / None follow the weight mode (Adam 3e-3 certified, SGD 0.025).
    ``arch_start_epoch``: architecture steps begin in this (0-based) epoch (PC-DARTS waits some epochs).
    ``a_lr_schedule``: cosine (default) decays the architecture learning rate per step from ``a_lr`` to
    ``a_lr_min`` over the architecture steps, so the genotype settles at the end (README, "Why the search
    defaults"); constant keeps ``a_lr`` (every search before 2026-12-05).
    ``metric_follows_ramp``: with a certified weight mode, R is measured at the weight step's current eps
    (0 in the warm-up: the clean margin; then the ramp's eps: the bound the weights are being trained to
    tighten; ``eps`` after the ramp) instead of at ``eps`` throughout, where the bound of a supernet not
    yet trained for it is vacuous (README, "Why the search defaults")."""
    data: str = data_setting()
    data_root: Optional[str] = data_root_setting()
    image_size: int = setting(32, "Image size for --data imagenet.")
    term: str = setting("clb", "Robustness term R of the architecture loss L_val - gamma * R.", choices=TERMS)
    strategy: str = setting("darts", "How the search trains: darts, sdarts-adv (architecture weights perturbed in the "
                            "weight step) or pgd (weights and architecture on PGD examples).", choices=STRATEGIES)
    gamma: float = setting(0.05, "Weight of R in L_val - gamma * R.")
    bound: str = setting("ibp", "Bound method of the clb term.", choices=("ibp", "crown-ibp", "crown"))
    eps: float = eps_setting(0.01, "0.01")
    norm: str = norm_setting()
    clb_form: str = setting("margin", "clb as the mean certified margin at eps, or the mean certified radius "
                            "(implicit gradient).", choices=("margin", "radius"))
    clb_scale: str = setting("log", "R from margin bounds m: log = sign(m) log(1+|m|) (default), linear = the paper's "
                             "mean m.", choices=("log", "linear"))
    metric_samples: int = setting(8, "Samples of each validation batch R is computed on (0: the whole batch).")
    jacobian_projections: int = setting(1, "Jacobian term from M classes drawn at random per batch (default 1: an "
                                           "unbiased estimate at 1/K of the cost); 0: exact, K double-backprop passes.")
    radius_max: float = 0.3
    radius_steps: int = 8
    radius_min: float = setting(1e-6, "Smallest radius the radius form resolves (log-space bisection up to 0.3; "
                                      "0: linear bisection from 0).")
    sdarts_epsilon: float = 0.3
    sdarts_steps: int = 7
    pgd_steps: int = 7
    weight_mode: str = setting("auto", "How the weight step trains the supernet: standard (DARTS), ibp or crown-ibp "
                               "(certified training, eps ramped to --weight-eps); auto: ibp for the clb / combined "
                               "terms with the darts strategy, standard otherwise.", choices=WEIGHT_MODES)
    weight_eps: Optional[float] = setting(None, "Target eps of certified weight steps (default: --eps).", kind="eps")
    warmup_epochs: int = setting(1, "Clean epochs before certified weight steps start.")
    ramp_epochs: Optional[int] = setting(None, "Epochs over which the weight eps grows (default: half).")
    kappa_end: float = 0.0
    stem: str = setting("strided", "Supernet stem: cifar (stride 1, as DARTS) or strided (stride 2, a quarter of the "
                        "cost).", choices=STEMS[:2])
    layers: int = setting(2, "Cells in the supernet (paper: 8; fewer than 3 has no reduction cell).")
    init_channels: int = setting(4, "Initial channels (paper: 16).")
    steps: int = 4
    multiplier: int = 4
    partial_channels: int = setting(1, "PC-DARTS channel fraction 1/K (1: off).")
    edge_normalization: bool = setting(False, "PC-DARTS edge normalisation.")
    epochs: int = setting(4, "Search epochs (paper: 50).")
    batch_size: int = setting(32, "Batch size.")
    train_limit: int = setting(1280, "Training samples per epoch (0: all).")
    val_limit: int = setting(1280, "Validation samples per epoch (0: all).")
    order: int = setting(1, "1: first-order DARTS; 2: unrolled second-order.", choices=(1, 2))
    w_optimizer: str = "auto"
    w_lr: Optional[float] = setting(None, "Learning rate of the weights (default: Adam 3e-3 certified, SGD 0.025 "
                                          "standard).")
    w_lr_min: float = 0.001
    w_momentum: float = 0.9
    w_weight_decay: float = 3e-4
    grad_clip: float = 5.0
    a_lr: float = setting(0.2, "Adam learning rate of the architecture weights.")
    a_lr_schedule: str = setting("cosine", "Architecture learning rate over the search: cosine (decays per "
                                 "architecture step from --a-lr to --a-lr-min) or constant.", choices=A_LR_SCHEDULES)
    a_lr_min: float = setting(0.0, "Final architecture learning rate of --a-lr-schedule cosine.")
    arch_start_epoch: int = setting(0, "Epoch (0-based) of the first architecture step.")
    metric_follows_ramp: bool = setting(True, "With certified weight steps, measure R at their current eps (0 in the "
                                              "warm-up, then the ramp's) or always at --eps.",
                                        flag="--metric-follows-ramp/--metric-at-eps")
    a_weight_decay: float = 1e-3
    seed: int = seed_setting()
    device: str = device_setting()

    def validate(self) -> "SearchConfig":
        check_choices(self)
        for name in ("layers", "init_channels", "epochs", "batch_size", "partial_channels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.gamma < 0 or self.eps < 0 or self.metric_samples < 0:
            raise ConfigError("gamma, eps and metric_samples must be >= 0")
        if not 0 <= self.radius_min < self.radius_max:
            raise ConfigError(f"radius_min must be in [0, radius_max = {self.radius_max}), got {self.radius_min}")
        if self.strategy != "darts" and self.resolved_weight_mode() != "standard":
            raise ConfigError(f"the {self.strategy} strategy has its own weight step; use --weight-mode standard")
        if (self.weight_eps or 0) < 0 or self.warmup_epochs < 0 or (self.ramp_epochs or 0) < 0:
            raise ConfigError("weight_eps, warmup_epochs and ramp_epochs must be >= 0")
        if not 0 <= self.a_lr_min <= self.a_lr:
            raise ConfigError(f"a_lr_min must be in [0, a_lr = {self.a_lr}], got {self.a_lr_min}")
        if not 0 <= self.arch_start_epoch < self.epochs:
            raise ConfigError(f"architecture steps would start in epoch {self.arch_start_epoch + 1} of {self.epochs}: "
                              "use more --epochs or a smaller --arch-start-epoch")
        self.weight_training().validate()
        return self

    def resolved_weight_mode(self) -> str:
        if self.weight_mode != "auto":
            return self.weight_mode
        return "ibp" if self.term in ("clb", "combined") and self.strategy == "darts" else "standard"

    @property
    def metric(self) -> Optional[str]:
        """The one-word ``--metric`` for this term and strategy; None for a combination it cannot name."""
        if self.strategy == "darts":
            return self.term
        return self.strategy if self.term == "none" else None

    @classmethod
    def upgrade(cls, saved: Dict[str, Any]) -> Dict[str, Any]:
        """Settings saved before ``metric`` was split into ``term`` and ``strategy``, in today's form."""
        saved = dict(saved)
        if "metric" in saved:
            saved["term"], saved["strategy"] = split_metric(saved.pop("metric"))
        return saved

    def weight_training(self) -> TrainConfig:
        """The weight step's settings in the form final training takes them (its loss and schedule
        are the same code), ``auto`` settings resolved."""
        return TrainConfig(mode=self.resolved_weight_mode(), eps=self.eps if self.weight_eps is None else self.weight_eps,
                           norm=self.norm, warmup_epochs=self.warmup_epochs, ramp_epochs=self.ramp_epochs,
                           kappa_end=self.kappa_end,
                           epochs=self.epochs, optimizer=self.w_optimizer, lr=self.w_lr, lr_min=self.w_lr_min,
                           momentum=self.w_momentum, weight_decay=self.w_weight_decay, grad_clip=self.grad_clip,
                           batch_size=self.batch_size, seed=self.seed, device=self.device).resolved()

    def metric_config(self) -> MetricConfig:
        """The metric's settings, read from the same-named fields of this (flat) config."""
        return MetricConfig(**{f.name: getattr(self, f.name) for f in fields(MetricConfig)})


def build_supernet(config: SearchConfig, info) -> SearchNetwork:
    return SearchNetwork(C=config.init_channels, num_classes=info.num_classes, layers=config.layers,
                         in_channels=info.in_channels, steps=config.steps, multiplier=config.multiplier,
                         mean=info.mean, std=info.std, partial_channels=config.partial_channels,
                         edge_normalization=config.edge_normalization, stem=config.stem)


class Searcher:
    """Holds the supernet, optimisers and step functions of one search."""

    def __init__(self, config: SearchConfig, info, world: World = World(), arch_steps: int = 0):
        """``arch_steps``: how many architecture steps the search makes (the length of a cosine
        ``a_lr_schedule``; 0 leaves the architecture learning rate constant)."""
        self.config = config
        self.world = world
        self.device = torch.device(config.device)
        check_even_reductions(info.image_size, config.layers, config.stem)
        if world.active and config.order != 1:
            raise ConfigError("second-order search (--order 2) runs in one process; use --order 1 with several ranks")
        if world.active and config.term in ("jacobian", "combined") and config.metric_samples == 0:
            # its double backward would pass through the synchronised batch norm, whose gradient is
            # summed over ranks once, not differentiated again
            raise ConfigError(f"--term {config.term} with --metric-samples 0 runs in one process; "
                              "give --metric-samples N (measured whole on rank 0) with several ranks")
        self.net = build_supernet(config, info).to(self.device)
        self.weight_config = training = config.weight_training()
        if training.init == "ibp":
            ibp_initialise(self.net)
        if world.active:
            synchronise_batch_norm(self.net)
            world.broadcast_module(self.net)
        self.w_opt = make_optimizer(self.net.weight_parameters(), training)
        # only the weights of cell types the supernet has (weight decay alone would move the others)
        self.a_opt = torch.optim.Adam(self.net.searched_arch_parameters(), lr=config.a_lr, betas=(0.5, 0.999),
                                      weight_decay=config.a_weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.w_opt, config.epochs, eta_min=config.w_lr_min)
        self.a_scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(self.a_opt, arch_steps, eta_min=config.a_lr_min)
                            if config.a_lr_schedule == "cosine" and arch_steps > 0 else None)
        self.metric_name = config.term
        self.metric_config = config.metric_config()

    # -- the architecture objective -------------------------------------------------------------
    def arch_objective(self, x: torch.Tensor, y: torch.Tensor, eps: Optional[float] = None,
                       metric: Optional[MetricBatch] = None) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, float], Dict[str, float]]:
        """``(L_val, gamma * R, loss details, metric details)``, R at ``eps`` (None: the configured eps); the
        architecture step minimises L_val - gamma * R. R is measured on the first metric_samples of the
        batch (0: all of it), or on ``metric`` where given (several ranks; no samples: R = 0)."""
        with self.world.synchronised_statistics():
            logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        if metric is None:
            n = self.config.metric_samples or len(x)
            metric = MetricBatch(x[:n], y[:n])
        metric_config = self.metric_config if eps is None else replace(self.metric_config, eps=eps)
        if len(metric.x) > 0:
            sync = self.world.synchronised_statistics() if metric.synchronised else contextlib.nullcontext()
            with sync:
                value, metric_details = robustness(self.metric_name, self.net, metric.x, metric.y, metric_config)
            metric_details = {"R": float(value.detach()), **metric_details}
        else:
            value, metric_details = loss.new_zeros(()), {}
        details = {"val_loss": loss.item(), "val_acc": (logits.argmax(1) == y).float().mean().item()}
        return loss, self.config.gamma * value, details, metric_details

    def arch_step(self, x_val, y_val, x_train, y_train, eps: Optional[float] = None,
                  share: float = 1.0, metric: Optional[MetricBatch] = None) -> Dict[str, float]:
        """One step on ``L_val - gamma R`` (R at ``eps``, None: the configured eps); the details hold the
        norms of both parts' gradients. With several ranks, this rank's validation shard holds ``share``
        of the batch and ``metric`` the samples (and their share) of R's batch this rank measures."""
        self.a_opt.zero_grad(set_to_none=True)
        if self.config.order == 1:
            loss, reward, loss_details, metric_details = self.arch_objective(x_val, y_val, eps, metric)
            metric_share = metric.share if metric is not None else 1.0
            arch = self.net.arch_parameters()
            grad_loss = _grads(loss * share, arch, retain_graph=True)
            grad_reward = (_grads(reward * metric_share, arch) if reward.requires_grad
                           else [torch.zeros_like(a) for a in arch])
            self.world.sum_tensors(grad_loss + grad_reward)
            details = self.world.combine([(loss_details, share), (metric_details, metric_share)])
            for a, g_loss, g_reward in zip(arch, grad_loss, grad_reward):
                a.grad = g_loss - g_reward
            details.update(_grad_norms(grad_loss, grad_reward))
        else:
            details = self._unrolled_arch_gradient(x_val, y_val, x_train, y_train, eps)
        for p in self.net.weight_parameters():
            p.grad = None
        self.a_opt.step()
        if self.a_scheduler is not None:
            self.a_scheduler.step()
        return details

    def _unrolled_arch_gradient(self, x_val, y_val, x_train, y_train, eps: Optional[float] = None) -> Dict[str, float]:
        """Second-order DARTS: grad_a J(w', a) - xi * HVP, w' = w - xi grad_w L_train(w, a)."""
        weights = list(self.net.weight_parameters())
        arch = self.net.arch_parameters()
        xi = self.w_opt.param_groups[0]["lr"]
        original = [w.detach().clone() for w in weights]
        train_loss = F.cross_entropy(self.net(x_train), y_train)
        grads = torch.autograd.grad(train_loss, weights, allow_unused=True)
        with torch.no_grad():
            for w, g in zip(weights, grads):
                if g is not None:
                    w.sub_(xi * g)
        loss, reward, details, metric_details = self.arch_objective(x_val, y_val, eps)
        details.update(metric_details)
        if reward.requires_grad:
            details.update(_grad_norms(_grads(loss, arch, retain_graph=True), _grads(reward, arch, retain_graph=True)))
        grads = torch.autograd.grad(loss - reward, arch + weights, allow_unused=True)
        arch_grads, weight_grads = grads[:len(arch)], grads[len(arch):]
        weight_grads = [torch.zeros_like(w) if g is None else g for w, g in zip(weights, weight_grads)]
        scale = 0.01 / torch.cat([g.flatten() for g in weight_grads]).norm().clamp_min(1e-12)
        hvp = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for w, w0, g in zip(weights, original, weight_grads):
                    w.copy_(w0 + sign * scale * g)
            loss = F.cross_entropy(self.net(x_train), y_train)
            hvp.append(_grads(loss, arch))
        with torch.no_grad():
            for w, w0 in zip(weights, original):
                w.copy_(w0)
        for a, g, plus, minus in zip(arch, arch_grads, *hvp):
            g = torch.zeros_like(a) if g is None else g
            a.grad = g - xi * (plus - minus) / (2 * scale)
        return details

    # -- the weight step ------------------------------------------------------------------------
    def weight_step(self, x, y, plan: Optional[Dict[str, float]] = None, share: float = 1.0) -> Dict[str, float]:
        """One weight step at the schedule's ``plan`` (None: the clean loss) on this rank's shard, which
        holds ``share`` of the batch (the gradients are summed over ranks)."""
        plan = plan or {"eps": 0.0, "kappa": 1.0, "beta": 1.0, "progress": 0.0}
        perturbation = self._sdarts_perturbation(x, y, share) if self.config.strategy == "sdarts-adv" else None
        if perturbation is not None:
            with torch.no_grad():
                for a, d in zip(self.net.arch_parameters(), perturbation):
                    a.add_(d)
        self.w_opt.zero_grad(set_to_none=True)
        with self.world.synchronised_statistics():
            loss, details = training_loss(self.net, x, y, plan, self.weight_config)
        details = self.world.weighted_means(details, share)
        if not math.isfinite(details["train_loss"]):
            raise TrainingDivergedError(f"the supernet's weight loss became {details['train_loss']} at eps {plan['eps']:.4g}; "
                                        "try a smaller --eps or --w-lr, or more --ramp-epochs")
        (loss * share if self.world.active else loss).backward()
        self.world.sum_gradients(self.net.weight_parameters())
        nn.utils.clip_grad_norm_(list(self.net.weight_parameters()), self.config.grad_clip)
        self.w_opt.step()
        if perturbation is not None:
            with torch.no_grad():
                for a, d in zip(self.net.arch_parameters(), perturbation):
                    a.sub_(d)
        for a in self.net.arch_parameters():
            a.grad = None
        return details

    def _sdarts_perturbation(self, x, y, share: float = 1.0) -> List[torch.Tensor]:
        """PGD on the architecture parameters within an L-inf ball of radius sdarts_epsilon,
        maximising the training loss (of the global batch: gradients summed over ranks)."""
        epsilon, steps = self.config.sdarts_epsilon, self.config.sdarts_steps
        arch = self.net.arch_parameters()
        deltas = [torch.empty_like(a).uniform_(-epsilon, epsilon) for a in arch]
        for _ in range(steps):
            with torch.no_grad():
                for a, d in zip(arch, deltas):
                    a.add_(d)
            with self.world.synchronised_statistics():
                loss = F.cross_entropy(self.net(x), y) * share
            grads = _grads(loss, arch)  # zeros for a cell type the supernet does not have
            self.world.sum_tensors(grads)
            with torch.no_grad():
                for a, d, g in zip(arch, deltas, grads):
                    a.sub_(d)
                    d.add_(2.5 * epsilon / steps * g.sign()).clamp_(-epsilon, epsilon)
        return deltas

    def adversarial(self, x, y) -> torch.Tensor:
        return PGD(self.net, self.config.eps, self.config.norm, steps=self.config.pgd_steps)(x, y)


def search(config: SearchConfig, out: Path, *, resume: bool = False, force: bool = False, quiet: bool = False,
           world: World = World()) -> Dict:
    """Run (or resume) a search into ``out``; returns the final record (genotype and settings). With
    several ranks (``world``, certnas.distributed) each takes its share of every batch; rank 0 writes."""
    if config.batch_size < world.size:
        raise ConfigError(f"--batch-size {config.batch_size} is smaller than the {world.size} ranks")
    out, splits = start_run(config, out, resume=resume, force=force, world=world)
    train_count = min(len(splits.train), config.train_limit or len(splits.train))
    batches = math.ceil(train_count / config.batch_size)
    arch_start = config.arch_start_epoch
    searcher = Searcher(config, splits.info, world, arch_steps=(config.epochs - arch_start) * batches)
    device = searcher.device
    follow_ramp = config.metric_follows_ramp and searcher.weight_config.certified

    def epoch_fn(epoch: int, progress) -> Dict[str, float]:
        searcher.net.train()
        train_order = epoch_batches(splits.train, config.batch_size, config.seed, epoch, config.train_limit)
        val_order = epoch_batches(splits.val, config.batch_size, config.seed + 7919, epoch, config.val_limit)
        sums: Dict[str, float] = {}
        for step, index in enumerate(train_order):
            x, y = collate(splits.train, world.shard(index), device)
            val_index = val_order[step % len(val_order)]
            xv, yv = collate(splits.val, world.shard(val_index), device)
            metric = _metric_batch(world, splits.val, val_index, (xv, yv), config.metric_samples, device)
            if config.strategy == "pgd":
                x, xv = searcher.adversarial(x, y), searcher.adversarial(xv, yv)
            plan = schedule(searcher.weight_config, epoch * batches + step, batches)
            # before arch_start the architecture is not stepped, so its objective is not computed either
            metric_eps = plan["eps"] if follow_ramp and plan["progress"] < 1 else None  # None: config.eps
            arch = (searcher.arch_step(xv, yv, x, y, metric_eps, world.share(val_index), metric)
                    if epoch >= arch_start else {})
            if arch:
                arch["metric_eps"] = config.eps if metric_eps is None else metric_eps
            row = {**arch, **searcher.weight_step(x, y, plan, world.share(index))}
            for key, value in row.items():
                sums[key] = sums.get(key, 0.0) + value
            progress.set_postfix(loss=f"{row['train_loss']:.3f}", acc=f"{row['train_acc']:.2f}", R=f"{row.get('R', float('nan')):.3g}",
                                 eps=f"{plan['eps']:.3g}")
            progress.update()
        searcher.scheduler.step()
        means = {key: round(value / len(train_order), 6) for key, value in sums.items()}
        means["eps"] = round(plan["eps"], 6)  # the weight step's eps at the end of the epoch
        means["arch_entropy"] = round(arch_entropy(searcher.net), 6)
        with torch.no_grad():
            for cell, reduction in (("normal", False), ("reduce", True)):
                mean_weight = searcher.net.mixing_weights(reduction).mean(dim=0)
                for name, value in zip(searcher.net.primitives, mean_weight.tolist()):
                    means[f"w_{cell}_{name}"] = round(value, 6)
        means["lr"] = searcher.w_opt.param_groups[0]["lr"]
        means["a_lr"] = round(searcher.a_opt.param_groups[0]["lr"], 8)  # after the epoch's last architecture step
        return means

    def after_epoch(epoch, row):
        row["genotype"] = searcher.net.genotype().to_json()

    state = {"model": searcher.net, "w_opt": searcher.w_opt, "a_opt": searcher.a_opt, "scheduler": searcher.scheduler}
    if searcher.a_scheduler is not None:  # only then: checkpoints of constant-rate searches keep their keys
        state["a_scheduler"] = searcher.a_scheduler
    history = run_epochs(out=out, epochs=config.epochs, state=state, resume=resume, epoch_fn=epoch_fn,
                         batches_per_epoch=batches, after_epoch=after_epoch, description="search", quiet=quiet,
                         world=world)
    genotype = searcher.net.genotype()
    record = {**genotype.to_dict(), "arch_weights": arch_weights(searcher.net),
              "searched_cells": ["reduce" if r else "normal" for r in searcher.net.cell_types()], "settings": asdict(config),
              "seed": config.seed, "versions": environment(), "epochs_completed": len(history)}
    if not world.main:
        return record
    atomic_write_json(out / "genotype.json", record)
    from certnas.plots import plot_arch_history, plot_genotype
    plot_genotype(genotype, out / "cells.png")
    plot_arch_history(history, searcher.net.primitives, out / "arch_weights.png")
    return record


@dataclass
class MetricBatch:
    """The samples a rank measures R on, their share of R's batch, and whether batch norm takes its
    statistics over all ranks' metric samples."""
    x: torch.Tensor
    y: torch.Tensor
    share: float = 1.0
    synchronised: bool = False


def _metric_batch(world: World, dataset, index: torch.Tensor, shard: Tuple[torch.Tensor, torch.Tensor],
                  metric_samples: int, device) -> Optional[MetricBatch]:
    """What this rank measures R on so that the ranks together measure it as one process does (None in
    one process: the first metric_samples of the batch). A fixed subset (metric_samples > 0) is measured
    whole on rank 0, as one batch (its batch-norm statistics are the subset's, whatever the metric); R
    over the whole batch (0) is measured on every shard with synchronised batch-norm statistics."""
    if not world.active:
        return None
    if metric_samples:
        if not world.main:
            return MetricBatch(shard[0][:0], shard[1][:0], share=0.0)
        x, y = collate(dataset, index[:metric_samples], device)
        return MetricBatch(x, y, share=1.0)
    return MetricBatch(shard[0], shard[1], share=world.share(index), synchronised=True)


def _grads(value: torch.Tensor, params: List[torch.Tensor], retain_graph: bool = False) -> List[torch.Tensor]:
    grads = torch.autograd.grad(value, params, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _grad_norms(grad_loss: List[torch.Tensor], grad_reward: List[torch.Tensor]) -> Dict[str, float]:
    """L2 norms of d L_val / d alpha and d (gamma R) / d alpha, and the share of the reward's."""
    loss = torch.cat([g.flatten() for g in grad_loss]).norm().item()
    reward = torch.cat([g.flatten() for g in grad_reward]).norm().item()
    return {"grad_val": loss, "grad_gamma_R": reward, "grad_ratio": reward / max(loss, 1e-30)}


def arch_weights(net: SearchNetwork) -> Dict[str, List[List[float]]]:
    weights = {"normal": net.mixing_weights(False).tolist(), "reduce": net.mixing_weights(True).tolist(),
               "primitives": list(net.primitives)}
    if net.edge_normalization:
        weights["edge_normal"] = net.edge_weights(False).tolist()
        weights["edge_reduce"] = net.edge_weights(True).tolist()
    return weights


def arch_entropy(net: SearchNetwork) -> float:
    """Mean entropy (nats) of the per-edge operation distributions of the cell types the supernet has."""
    with torch.no_grad():
        total = []
        for reduction in net.cell_types():
            w = net.mixing_weights(reduction)
            total.append(-(w * w.clamp_min(1e-12).log()).sum(dim=1))
        return torch.cat(total).mean().item()
