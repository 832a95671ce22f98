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

import logging
import math
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import ConcatDataset

from certnas.attacks import PGD
from certnas.config import (ConfigError, check_choices, data_root_setting, data_setting, device_setting, eps_setting, norm_setting,
                            seed_setting, setting)
from certnas.data import DataInfo
from certnas.distributed import World, synchronise_batch_norm
from certnas.io import save_model
from certnas.files import atomic_write_json, environment
from certnas.runs import collate, epoch_batches, run_epochs, start_run
from certnas.space.genotype import NAMED, Genotype, GenotypeError
from certnas.space.network import STEMS, NetworkConfig, build_network, final_map_size, odd_reduction
from verifiers.bounds import parse_norm
from certnas.errors import CertnasError

logger = logging.getLogger(__name__)

MODES = ("standard", "pgd", "ibp", "crown-ibp")
CERTIFIED_MODES = ("ibp", "crown-ibp")
NETWORKS = ("darts", "mlp", "cnn")
# hand-designed CNNs of the sizes the IBP paper (Gowal et al. 2018) reports: (channels, kernel, stride) per
# convolution, then fully connected widths
CNN_PRESETS = {"small": "c16k4s2,c32k4s1,f100",
               "medium": "c32k3s1,c32k4s2,c64k3s1,c64k4s2,f512,f512",
               "large": "c64k3s1,c64k3s1,c128k3s2,c128k3s1,c128k3s1,f512"}
OPTIMIZERS = ("auto", "sgd", "adam")
INITS = ("auto", "standard", "ibp")
EPS_SCHEDULES = ("smooth", "linear", "log")
REG_FORMS = ("log", "ratio")
DEFAULT_LR = {"sgd": 0.025, "adam": 3e-3}
DEFAULT_EPOCHS = {"standard": 10, "pgd": 10, "ibp": 20, "crown-ibp": 20}


class TrainingDivergedError(CertnasError):
    """The training loss became non-finite or exploded; the last good checkpoint is kept."""


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run. Defaults: the embedded-MNIST CPU setting (README: two PC-DARTS
    cells, 16 channels, the strided stem); the paper's final network is layers=20, init_channels=36,
    stem="cifar", epochs=600, auxiliary, drop_path=0.2.

    ``auto`` / None settings depend on the mode (see :meth:`resolved`): certified modes (ibp,
    crown-ibp) train 20 epochs, ramping eps over the first half after one clean epoch, with Adam at
    lr 3e-3 and IBP initialisation (Shi et al. 2021); standard and pgd train 10 epochs with SGD at
    lr 0.025 and PyTorch's default initialisation (pgd ramps eps over 2 epochs)."""
    data: str = data_setting()
    data_root: Optional[str] = data_root_setting()
    image_size: int = setting(32, "Image size for --data imagenet.")
    network: str = setting("darts", "darts: the cell network of --genotype; mlp: a plain ReLU MLP (small enough for "
                           "--method milp); cnn: a plain ReLU CNN (--cnn).", choices=NETWORKS)
    cnn: str = setting("small", "Layers of --network cnn: small, medium or large (the IBP paper's sizes), or a list "
                       "like c16k4s2,c32k4s1,f100 (convolutions: channels, kernel, stride; then fully connected "
                       "widths).")
    genotype: str = setting("PC_DARTS", "genotype.json from certnas search, or a published cell: DARTS_V1, DARTS_V2, "
                            "PC_DARTS.")
    layers: int = setting(2, "Cells (paper: 20; reduction cells at 1/3 and 2/3 of the depth from 3 cells on).")
    init_channels: int = setting(16, "Initial channels (paper: 36).")
    auxiliary: bool = setting(False, "Auxiliary head (weight 0.4).")
    stem: str = setting("strided", "strided: one stride-2 3x3 convolution (cells at half the resolution); cifar: the "
                        "same at stride 1 (DARTS' CIFAR stem, the paper's); imagenet: three stride-2 convolutions (for "
                        "large images).", choices=STEMS)
    head_grid: int = setting(0, "Classifier input: means over a GxG grid of the last cell's maps, flattened (keeps "
                                "where a feature is; G must divide the map size); 1 = DARTS' global average pooling; "
                                "0 = the largest G up to 7 that divides the map size (7 on 28x28 digits).")
    auxiliary_weight: float = 0.4
    drop_path: float = setting(0.0, "Drop-path probability, reached linearly by the last epoch (paper: 0.2; not with "
                                    "ibp/crown-ibp).")
    hidden: Tuple[int, ...] = setting((128, 128), "Hidden widths of --network mlp.", kind="ints")
    mode: str = setting("standard", "Training objective.", choices=MODES)
    eps: float = eps_setting(0.1, "0.1")
    eps_train: Optional[float] = setting(None, "eps the robust modes train at (default: --eps, the eps reported in "
                                               "the summary).", kind="eps")
    norm: str = norm_setting()
    pgd_steps: int = setting(7, "PGD steps of --mode pgd.")
    warmup_epochs: int = setting(1, "Clean epochs before the eps ramp.")
    ramp_epochs: Optional[int] = setting(None, "Epochs over which eps grows to its target (default: half the epochs "
                                               "for ibp / crown-ibp, 2 for pgd).")
    eps_schedule: str = setting("smooth", "Shape of the certified modes' eps ramp: smooth (slow polynomial start, "
                                "then linear), linear, or log (equal time per decade from --eps-start).",
                                choices=EPS_SCHEDULES)
    eps_start: float = setting(1e-6, "Where --eps-schedule log starts.", kind="eps", shown="1e-6")
    kappa_end: float = setting(0.0, "Weight of the clean loss at the end of the ramp (from 1): kappa CE + (1 - kappa) "
                                    "robust CE.")
    beta_start: float = 1.0
    beta_end: float = 0.0
    crown_rows: int = setting(1, "crown-ibp: back-substitute only the margins of this many classes with the lowest "
                                 "IBP bound (0: all); the rest keep their IBP bound.")
    reg_weight: float = setting(0.5, "Weight of the warm-up regulariser during the ramp (bound tightness and ReLU "
                                     "balance; 0: off).")
    reg_tolerance: float = 0.5
    reg_form: str = setting("log", choices=REG_FORMS)
    epochs: Optional[int] = setting(None, "Training epochs (default: 20 for ibp / crown-ibp, 10 otherwise; paper: "
                                          "600).")
    batch_size: int = setting(64, "Batch size.")
    train_limit: int = setting(0, "Training samples per epoch (0: all).")
    eval_limit: int = 1000
    optimizer: str = setting("auto", "auto: Adam for ibp / crown-ibp, SGD (momentum 0.9) otherwise.",
                             choices=OPTIMIZERS)
    lr: Optional[float] = setting(None, "Learning rate, cosine-annealed (default: 0.025 for SGD, 3e-3 for Adam).")
    lr_min: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    init: str = setting("auto", choices=INITS)
    max_loss: float = setting(1e4, "Stop (keeping the last good checkpoint) when a batch loss exceeds this; 0: only "
                                   "a non-finite loss stops.")
    seed: int = seed_setting()
    device: str = device_setting()

    @property
    def certified(self) -> bool:
        return self.mode in CERTIFIED_MODES

    def resolved(self) -> "TrainConfig":
        """This config with every ``auto`` / None setting replaced by the value it stands for."""
        optimizer = self.optimizer if self.optimizer != "auto" else ("adam" if self.certified else "sgd")
        epochs = DEFAULT_EPOCHS.get(self.mode, 10) if self.epochs is None else self.epochs
        ramp = (max(epochs // 2, 1) if self.certified else 2) if self.ramp_epochs is None else self.ramp_epochs
        return replace(self, optimizer=optimizer, lr=DEFAULT_LR[optimizer] if self.lr is None else self.lr,
                       init=self.init if self.init != "auto" else ("ibp" if self.certified else "standard"),
                       eps_train=self.eps if self.eps_train is None else self.eps_train, epochs=epochs,
                       ramp_epochs=ramp)

    def validate(self) -> "TrainConfig":
        """Raise ConfigError for an unknown or out-of-range setting; returns self."""
        check_choices(self)
        resolved = self.resolved()
        for name in ("layers", "init_channels", "epochs", "batch_size", "pgd_steps"):
            if getattr(resolved, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(resolved, name)}")
        if self.eps < 0 or self.warmup_epochs < 0 or resolved.ramp_epochs < 0 or (self.eps_train or 0) < 0:
            raise ConfigError("eps, eps_train, warmup_epochs and ramp_epochs must be >= 0")
        if self.head_grid < 0:
            raise ConfigError(f"head_grid must be >= 0 (0: automatic), got {self.head_grid}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.crown_rows < 0 or self.reg_weight < 0 or not 0 < self.reg_tolerance <= 1 or self.max_loss < 0:
            raise ConfigError("crown_rows, reg_weight and max_loss must be >= 0 and reg_tolerance in (0, 1]")
        if not 0 <= self.drop_path < 1:
            raise ConfigError(f"drop_path must lie in [0, 1), got {self.drop_path}")
        if self.certified and self.drop_path > 0:
            raise ConfigError("drop-path makes the network random, so its bounds would not hold: "
                              "use --drop-path 0 with --mode ibp / crown-ibp")
        if self.network == "mlp" and (not self.hidden or min(self.hidden) < 1):
            raise ConfigError(f"--hidden must list positive widths, got {self.hidden}")
        if self.network == "cnn":
            cnn_layers(self.cnn)
        return self


def cnn_layers(text: str) -> Tuple[Tuple[Tuple[int, int, int], ...], Tuple[int, ...]]:
    """(convolutions as (channels, kernel, stride), fully connected widths) of a --cnn preset or list;
    ConfigError (one line) for anything else."""
    spec = CNN_PRESETS.get(text, text)
    convs, hidden = [], []
    for part in spec.split(","):
        match = re.fullmatch(r"c(\d+)k(\d+)s(\d+)|f(\d+)", part.strip())
        values = [int(v) for v in match.groups() if v is not None] if match else []
        if not values or min(values) < 1 or (match.group(4) is None and hidden):
            raise ConfigError(f"--cnn {text!r}: expected small, medium, large or a list like c16k4s2,c32k4s1,f100 "
                              "(convolutions first, every number >= 1)")
        (hidden if match.group(4) is not None else convs).append(values[0] if len(values) == 1 else tuple(values))
    if not convs:
        raise ConfigError(f"--cnn {text!r}: needs at least one convolution (cCkKsS)")
    return tuple(convs), tuple(hidden)


def resolve_genotype(text: str) -> Genotype:
    """A published genotype by name (DARTS_V1, DARTS_V2, PC_DARTS) or a genotype.json file."""
    if text in NAMED:
        return NAMED[text]
    path = Path(text)
    if not path.is_file():
        raise GenotypeError(f"--genotype {text!r}: neither a file nor a known name ({', '.join(NAMED)})")
    return Genotype.from_json(path.read_text())


def check_even_reductions(image_size: int, layers: int, stem: str) -> None:
    """ConfigError (one line) if a reduction cell of this network or supernet would get odd-sized maps."""
    problem = odd_reduction(image_size, layers, stem)
    if problem:
        raise ConfigError(f"--layers {layers} with --stem {stem} on {image_size}x{image_size} images: {problem}, and "
                          "stride-2 pooling needs even sizes; use --stem cifar or fewer --layers")


def make_optimizer(parameters, config: TrainConfig) -> torch.optim.Optimizer:
    """The weight optimiser of a resolved config: Adam or SGD with momentum, both with weight decay."""
    if config.optimizer == "adam":
        return torch.optim.Adam(parameters, config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(parameters, config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def network_config(config: TrainConfig, info: DataInfo) -> NetworkConfig:
    """The network a training config describes on this data; ``head_grid`` 0 resolved to its grid."""
    genotype = resolve_genotype(config.genotype).to_dict() if config.network == "darts" else None
    head_grid = 1
    if config.network == "darts":
        check_even_reductions(info.image_size, config.layers, config.stem)
        size = final_map_size(info.image_size, config.layers, config.stem)
        if config.head_grid and size % config.head_grid:
            raise ConfigError(f"--head-grid {config.head_grid} does not divide the last cell's {size}x{size} maps")
        head_grid = config.head_grid or max(g for g in range(1, min(7, size) + 1) if size % g == 0)
    convs, hidden = cnn_layers(config.cnn) if config.network == "cnn" else ((), tuple(config.hidden))
    built = NetworkConfig(kind=config.network, in_channels=info.in_channels, image_size=info.image_size,
                         num_classes=info.num_classes, mean=tuple(info.mean), std=tuple(info.std), genotype=genotype,
                         layers=config.layers, init_channels=config.init_channels, auxiliary=config.auxiliary,
                         hidden=hidden, stem=config.stem, head_grid=head_grid, convs=convs)
    if config.network == "cnn":
        try:
            build_network(built)
        except ValueError as error:
            raise ConfigError(f"--cnn {config.cnn!r}: {error}") from None
    return built


def smooth_ramp(progress: float, knee: float = 0.25, power: float = 4.0) -> float:
    """Share of the target eps at ``progress`` in [0, 1] of the ramp: ``(progress / knee) ** power``
    scaled to join, with the same slope, a straight line that reaches 1 at the end. A slow start
    keeps the first certified steps from meeting the full width of an untrained network's bounds."""
    progress = min(max(progress, 0.0), 1.0)
    at_knee = knee / (power * (1 - knee) + knee)  # value at the knee that makes the slopes equal
    if progress < knee:
        return at_knee * (progress / knee) ** power
    return at_knee + (1 - at_knee) * (progress - knee) / (1 - knee)


def schedule(config: TrainConfig, step: int, steps_per_epoch: int) -> Dict[str, float]:
    """eps, kappa, beta and the ramp's progress at global batch ``step``: eps 0 during warm-up, then a
    ramp to the training eps (``smooth``, ``linear`` or ``log`` for the certified modes, linear for
    pgd; kappa and beta linear in the ramp's progress), then constant."""
    if config.mode == "standard":
        return {"eps": 0.0, "kappa": 1.0, "beta": config.beta_start, "progress": 0.0}
    if config.ramp_epochs is None or config.eps_train is None:
        config = config.resolved()
    start = config.warmup_epochs * steps_per_epoch
    length = config.ramp_epochs * steps_per_epoch
    progress = 1.0 if length == 0 else min(max((step - start + 1) / length, 0.0), 1.0)
    if step < start:
        progress = 0.0
    target = config.eps_train
    share = progress
    if config.certified and config.eps_schedule == "smooth":
        share = smooth_ramp(progress)
    elif config.certified and config.eps_schedule == "log" and progress > 0:
        share = min(config.eps_start / target, 1.0) ** (1.0 - progress) if target > 0 else 0.0
    return {"eps": target * share, "kappa": 1.0 - (1.0 - config.kappa_end) * progress,
            "beta": config.beta_start + (config.beta_end - config.beta_start) * progress, "progress": progress}


def certified_margins(model: nn.Module, x, y, eps: float, norm: str, mode: str, beta: float) -> torch.Tensor:
    """(B, K) margin lower bounds of the training mode by auto_LiRPA (beta mixes CROWN-IBP with IBP);
    the L2 path of certified training."""
    from verifiers.bounds import margin_lower_bounds
    if mode == "ibp" or beta <= 0:
        return margin_lower_bounds(model, x, y, eps, norm=norm, method="ibp")
    crown_ibp = margin_lower_bounds(model, x, y, eps, norm=norm, method="crown-ibp")
    if beta >= 1:
        return crown_ibp
    return beta * crown_ibp + (1 - beta) * margin_lower_bounds(model, x, y, eps, norm=norm, method="ibp")


def ibp_initialise(model: nn.Module) -> None:
    """Shi et al. (2021): weights of every convolution and linear layer but the classifier drawn from
    N(0, 2 pi / fan_in**2), which keeps IBP interval widths from growing layer after layer at the
    start of training. Fixed (buffer) kernels are not parameters and stay as they are."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for layer in layers[:-1]:
        fan_in = layer.weight[0].numel()
        with torch.no_grad():
            layer.weight.normal_(0.0, math.sqrt(2 * math.pi) / fan_in)


def warmup_regulariser(bounds, tolerance: float, form: str = "log") -> Tuple[torch.Tensor, Dict[str, float]]:
    """Warm-up terms after Shi et al. (2021), averaged over ReLUs, from the IBP bounds of each ReLU input:

    - tightness: with r the mean interval radius before the ReLU and r_in that of the input ball,
      ``ratio`` (Shi et al.): ``relu(tau - r_in / r) / tau``, which penalises bounds more than 1/tau times
      wider than the input ball but saturates (its gradient vanishes) when they are far wider;
      ``log``: ``relu(log(r / r_in) - log(1 / tau))``, the same threshold with a gradient that does not
      vanish, for deep networks whose widths start 1e6-1e15 times the input's (README, certified training);
    - balance: ``relu(tau - min(q, 1/q)) / tau`` for q the ratio of the mean (and of the spread) of the
      interval centres over the surely active and the surely inactive neurons: penalises a network
      whose ReLUs are mostly dead or mostly linear under the bounds.
    """
    radius_in = bounds.input_radius.mean().clamp_min(1e-30)
    tight, balance, count = 0.0, 0.0, 0
    for lower, upper in bounds.relu_inputs():
        centre, radius = (upper + lower) / 2, (upper - lower) / 2
        if form == "log":
            tight = tight + F.relu(torch.log(radius.mean().clamp_min(1e-30) / radius_in) + math.log(tolerance))
        else:
            tight = tight + F.relu(tolerance - radius_in / radius.mean().clamp_min(1e-30)) / tolerance
        active, inactive = (lower > 0).to(centre.dtype), (upper < 0).to(centre.dtype)
        spread = (centre - centre.mean()) ** 2
        for a, b in (((centre * active).mean(), -(centre * inactive).mean()),
                     ((spread * active).sum(), (spread * inactive).sum())):
            q = a / b.clamp_min(1e-12)
            term = F.relu(tolerance - torch.minimum(q, 1 / q.clamp_min(1e-12))) / tolerance
            if torch.isfinite(term):
                balance = balance + term
        count += 1
    if count == 0:
        return bounds.ibp.sum() * 0, {}
    tight, balance = tight / count, balance / count
    return tight + balance, {"reg_tightness": float(torch.as_tensor(tight).detach()),
                             "reg_balance": float(torch.as_tensor(balance).detach())}


def training_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, plan: Dict[str, float],
                  config: TrainConfig) -> Tuple[torch.Tensor, Dict[str, float]]:
    """The loss of ``config.mode`` on one batch at the schedule's ``plan`` (:func:`schedule`), with the
    values ``history.csv`` records. Shared by final training and the weight step of the search."""
    forward = getattr(model, "forward_with_aux", None)

    def natural(logits, aux):
        loss = F.cross_entropy(logits, y)
        if aux is not None:
            loss = loss + config.auxiliary_weight * F.cross_entropy(aux, y)
        return loss

    if config.mode == "pgd" and plan["eps"] > 0:
        x = PGD(model, plan["eps"], config.norm, steps=config.pgd_steps)(x, y)
    if not (config.certified and plan["eps"] > 0):
        logits, aux = forward(x) if forward is not None else (model(x), None)
        loss = natural(logits, aux)
        return loss, {"train_loss": loss.item(), "train_acc": (logits.argmax(1) == y).float().mean().item()}
    details: Dict[str, float] = {}
    regulariser = None
    if parse_norm(config.norm) == math.inf:
        from verifiers.interval import interval_margins
        use_crown = config.mode == "crown-ibp" and plan["beta"] > 0
        # the clean pass (a third of an IBP step) only feeds the clean loss and training-mode batch norm
        clean = plan["kappa"] > 0 or batch_norm_training(model)
        bounds = interval_margins(model, x, y, plan["eps"], crown_ibp=use_crown, crown_rows=config.crown_rows,
                                  forward=forward, clean=clean)
        logits, aux = bounds.logits, bounds.auxiliary
        margins = bounds.ibp if not use_crown else plan["beta"] * bounds.crown_ibp + (1 - plan["beta"]) * bounds.ibp
        strength = config.reg_weight * (1 - plan["progress"])
        if strength > 0:
            regulariser, reg_details = warmup_regulariser(bounds, config.reg_tolerance, config.reg_form)
            regulariser = strength * regulariser
            details.update(reg_details)
    else:  # L2: auto_LiRPA (its Lp-ball input nodes)
        logits, aux = forward(x) if forward is not None else (model(x), None)
        margins = certified_margins(model, x, y, plan["eps"], config.norm, config.mode, plan["beta"])
    robust = F.cross_entropy(-margins, y)
    loss = robust if logits is None else plan["kappa"] * natural(logits, aux) + (1 - plan["kappa"]) * robust
    if regulariser is not None:
        loss = loss + regulariser
    others = margins.scatter(1, y[:, None], float("inf"))
    details.update({"robust_loss": robust.item(), "train_verified": (others.min(1).values > 0).float().mean().item(),
                    "train_loss": loss.item(),  # train_acc: NaN where the clean pass was skipped
                    "train_acc": math.nan if logits is None else (logits.argmax(1) == y).float().mean().item()})
    return loss, details


def batch_norm_training(model: nn.Module) -> bool:
    """Whether any batch norm of ``model`` normalises with the batch's own statistics (training mode)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats)
               for m in model.modules())


class Trainer:
    """The network, optimiser and the loss of one training mode (``auto`` settings resolved here)."""

    def __init__(self, config: TrainConfig, network: NetworkConfig, world: World = World()):
        self.config = config = config.resolved()
        self.world = world
        self.device = torch.device(config.device)
        self.model = build_network(network).to(self.device)
        if config.init == "ibp":
            ibp_initialise(self.model)
        if world.active:
            synchronise_batch_norm(self.model)
            world.broadcast_module(self.model)
        self.optimizer = make_optimizer(self.model.parameters(), config)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, config.epochs, eta_min=config.lr_min)

    def loss(self, x: torch.Tensor, y: torch.Tensor, plan: Dict[str, float]) -> Tuple[torch.Tensor, Dict[str, float]]:
        return training_loss(self.model, x, y, plan, self.config)

    def step(self, x, y, plan, share: float = 1.0) -> Dict[str, float]:
        """One optimiser step on this rank's shard ``x, y`` holding ``share`` of the global batch (the
        gradients are summed over ranks); returns the global batch's mean details."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.world.synchronised_statistics():
            loss, details = self.loss(x, y, plan)
        details = self.world.weighted_means(details, share)
        if not math.isfinite(details["train_loss"]) or (self.config.max_loss and details["train_loss"] > self.config.max_loss):
            raise TrainingDivergedError(
                f"loss {details['train_loss']:.3g} at eps {plan['eps']:.4g}")
        (loss * share if self.world.active else loss).backward()
        self.world.sum_gradients(self.model.parameters())
        nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        return details


@torch.no_grad()
def verified_accuracy(model: nn.Module, dataset, device, eps: float, limit: int = 0, batch_size: int = 200,
                      crown_ibp: bool = True) -> Dict[str, float]:
    """Fraction of the first ``limit`` samples (0: all) that are correctly classified and certified at
    L-inf ``eps`` by IBP and by CROWN-IBP (eval mode; the interval engine of ``verifiers.interval``)."""
    from verifiers.interval import interval_margins
    was_training = model.training
    model.eval()
    count = min(len(dataset), limit or len(dataset))
    certified = {"ibp": 0, "crown-ibp": 0} if crown_ibp else {"ibp": 0}
    for start in range(0, count, batch_size):
        x, y = collate(dataset, torch.arange(start, min(start + batch_size, count)), device)
        bounds = interval_margins(model, x, y, eps, crown_ibp=crown_ibp)
        for name, margins in (("ibp", bounds.ibp), ("crown-ibp", bounds.crown_ibp)):
            if name in certified:
                certified[name] += (margins.scatter(1, y[:, None], float("inf")).min(1).values > 0).sum().item()
    model.train(was_training)
    return {name: value / max(count, 1) for name, value in certified.items()}


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


def train(config: TrainConfig, out: Path, *, resume: bool = False, force: bool = False, quiet: bool = False,
          world: World = World()) -> Dict[str, Any]:
    """Train into ``out`` (checkpoint.pt each epoch, history.csv, model.pt at the end); returns the
    summary also written to ``summary.json``. Raises TrainingDivergedError (the last completed epoch's
    checkpoint kept) when a batch loss is non-finite or above ``max_loss``. With several ranks
    (``world``, certnas.distributed) each takes its share of every batch and rank 0 writes."""
    config = config.validate().resolved()
    if config.batch_size < world.size:
        raise ConfigError(f"--batch-size {config.batch_size} is smaller than the {world.size} ranks")
    out, splits = start_run(config, out, resume=resume, force=force, world=world)
    network = network_config(config, splits.info)
    trainer = Trainer(config, network, world)
    train_set = ConcatDataset([splits.train, splits.val])
    count = min(len(train_set), config.train_limit or len(train_set))
    steps_per_epoch = math.ceil(count / config.batch_size)
    check_verified = config.certified and parse_norm(config.norm) == math.inf

    def epoch_fn(epoch: int, progress) -> Dict[str, float]:
        if hasattr(trainer.model, "drop_path_prob"):
            trainer.model.drop_path_prob = config.drop_path * epoch / config.epochs
        sums: Dict[str, float] = {}
        counts: Dict[str, int] = {}
        order = epoch_batches(train_set, config.batch_size, config.seed, epoch, config.train_limit)
        for index, batch in enumerate(order):
            plan = schedule(config, epoch * steps_per_epoch + index, steps_per_epoch)
            x, y = collate(train_set, world.shard(batch), trainer.device)
            try:
                row = trainer.step(x, y, plan, world.share(batch))
            except TrainingDivergedError as error:
                kept = (f"the checkpoint of epoch {epoch} is kept in {out / 'checkpoint.pt'}" if epoch > 0
                        else "no epoch completed, so there is no checkpoint")
                raise TrainingDivergedError(
                    f"training diverged in epoch {epoch + 1}, batch {index + 1}: {error}; {kept}. Try a smaller --lr, "
                    f"more --ramp-epochs, a smaller network or --eps (--max-loss 0 continues regardless)") from None
            for key, value in row.items():  # a NaN (train_acc without the clean pass) is left out of the mean
                if not math.isnan(value):
                    sums[key], counts[key] = sums.get(key, 0.0) + value, counts.get(key, 0) + 1
                else:
                    sums.setdefault(key, 0.0)
            progress.set_postfix(loss=f"{row['train_loss']:.3f}", acc=f"{row['train_acc']:.2f}", eps=f"{plan['eps']:.3g}")
            progress.update()
        trainer.scheduler.step()
        means = {key: round(value / counts[key], 6) if counts.get(key) else math.nan for key, value in sums.items()}
        means["eps"] = round(plan["eps"], 6)
        means["lr"] = trainer.optimizer.param_groups[0]["lr"]
        means["test_acc"] = round(accuracy(trainer.model, splits.test, trainer.device, config.eval_limit), 6)
        if check_verified:
            means["test_ibp_verified"] = round(verified_accuracy(trainer.model, splits.test, trainer.device, config.eps,
                                                                 config.eval_limit, crown_ibp=False)["ibp"], 6)
        return means

    state = {"model": trainer.model, "optimizer": trainer.optimizer, "scheduler": trainer.scheduler}
    history = run_epochs(out=out, epochs=config.epochs, state=state, resume=resume, epoch_fn=epoch_fn,
                         batches_per_epoch=steps_per_epoch, description=f"train ({config.mode})", quiet=quiet,
                         world=world)
    trainer.model.eval()
    top = topk_accuracies(trainer.model, splits.test, trainer.device, config.eval_limit,
                          ks=(1, 5) if network.num_classes > 5 else (1,))
    summary = {"test_acc": top[1], **({"test_top5_acc": top[5]} if 5 in top else {}),
               "test_samples": min(len(splits.test), config.eval_limit or len(splits.test)),
               "epochs_completed": len(history), "train_seconds": round(sum(r["seconds"] for r in history), 2),
               "parameters": sum(p.numel() for p in trainer.model.parameters())}
    if check_verified:
        verified = verified_accuracy(trainer.model, splits.test, trainer.device, config.eps, config.eval_limit)
        summary.update({f"test_{name}_verified": value for name, value in verified.items()})
        summary["verified_eps"] = config.eps
    summary["warnings"] = training_warnings(config, history)
    if not world.main:
        return summary
    for warning in summary["warnings"]:
        logger.warning(warning)
    save_model(trainer.model, out / "model.pt", network=network.to_dict(), dataset=asdict(splits.info),
               training=asdict(config), summary=summary, versions=environment())
    atomic_write_json(out / "summary.json", {**summary, "settings": asdict(config), "network": network.to_dict()})
    return summary


def training_warnings(config: TrainConfig, history) -> list:
    """What a researcher must not miss in a finished run: certified training that certifies nothing."""
    warnings = []
    ramp_end = config.warmup_epochs + config.ramp_epochs
    after = [row for row in history if row["epoch"] > ramp_end]
    if config.certified and after and all(row.get("train_verified", 0) == 0 for row in after):
        warnings.append(f"verified accuracy on the training batches stayed 0 after the eps ramp (epochs "
                        f"{ramp_end + 1}-{history[-1]['epoch']}): the certified bounds are vacuous; try a smaller network, "
                        f"a longer ramp or a smaller --eps")
    return warnings
