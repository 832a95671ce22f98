"""The cached stages of one scale: search -> train -> attack -> verify, and the ImageNet transfer."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional

from benchmarks.common import cached, cached_stage, config_hash, evaluated, model_digest, stage_settings
from benchmarks.paper.scales import ROWS, Scale
from certnas.attack_eval import AttackConfig, run_attacks
from certnas.search import SearchConfig, search
from certnas.train import TrainConfig, train
from certnas.verify_run import VerifyConfig, run_verify

# Settings certnas search gained after the committed cpu tables' searches ran. With standard weight steps
# they are inert (the certified weight step's schedule) or hold the behaviour those searches had; the
# weight optimiser ``auto`` resolves to the SGD at ``w_lr`` they ran with.
_ADDED_SINCE_CPU_TABLES = ("weight_mode", "weight_eps", "warmup_epochs", "ramp_epochs", "kappa_end", "stem",
                           "w_optimizer", "arch_start_epoch", "metric_follows_ramp", "radius_min")


def former_search_key(config: SearchConfig) -> Optional[str]:
    """The key the committed cpu tables' cache gave a search with these settings (their searches ran
    before the settings in ``_ADDED_SINCE_CPU_TABLES`` existed), or None where those settings do not hold
    that earlier behaviour. Without it every committed search would rerun after each new setting."""
    weights = config.weight_training()
    if (config.weight_mode, config.stem, config.arch_start_epoch, config.clb_form, weights.optimizer) != \
            ("standard", "cifar", 0, "margin", "sgd"):
        return None
    settings = {k: v for k, v in stage_settings(config).items() if k not in _ADDED_SINCE_CPU_TABLES}
    settings["w_lr"] = weights.lr
    return config_hash("search", settings)


def _model_key(model: Path) -> str:
    """What an evaluation stage's key names its model by: the digest its train stage recorded, so that rows
    whose searches derived the same cell train the same network (same seed and settings: bit-identical) and
    share one attack and one verify stage (else the train stage's folder)."""
    return model_digest(model.parent) or model.parent.name


class Pipeline:
    """Runs (or reuses) the cached stages of one scale."""

    def __init__(self, scale: Scale, out: Path, data_root: Optional[Path], device: str, quiet: bool = True,
                 crown_device: Optional[str] = None, crown_seeds: Optional[int] = None, crown_cached_only: bool = False):
        """``crown_device``: where the full-CROWN stage runs (default ``device``; the other stages keep
        ``device``, so a GPU can add the CROWN column to tables made on a CPU); ``crown_seeds``: that column
        only for seeds below it (default: every seed); ``crown_cached_only``: only the CROWN stages already
        in the cache (n/a for the others): a table from a GPU run that did not finish every stage."""
        self.scale, self.out, self.data_root, self.device, self.quiet = scale, Path(out), data_root, device, quiet
        self.crown_device, self.crown_seeds, self.crown_cached_only = crown_device or device, crown_seeds, crown_cached_only
        self.cache = self.out / "cache"
        self._retrain: Dict[Path, Any] = {}  # model file -> how to train it again (see _train_stage)

    def available(self, name: str) -> Optional[str]:
        """None if the data set can be loaded, else the reason it cannot."""
        if name == "mnist-embedded":
            return None
        if self.data_root is None:
            return f"no --data-root given for {name}"
        from certnas.data import DataError, load_data
        try:
            load_data(name, self.data_root, image_size=self._image_size(name))
        except DataError as error:
            return str(error)
        return None

    def _stage(self, stage: str, key: str, marker: str, run, model: Optional[Path] = None) -> Path:
        return cached_stage(self.cache, stage, key, marker, run, inputs=None if model is None else evaluated(model))

    def search_config(self, row: str, dataset: str, seed: int) -> SearchConfig:
        """The search a row runs at this scale (the paper's protocol, ``PAPER_PROTOCOL``)."""
        return SearchConfig(**{**self.scale.search, **ROWS[row]}, data=self._data(dataset), seed=seed,
                            data_root=self._root(dataset), image_size=self.scale.image_size, device=self.device)

    def search(self, row: str, dataset: str, seed: int) -> Path:
        config = self.search_config(row, dataset, seed)
        key = config_hash("search", stage_settings(config))
        former = former_search_key(config)
        if former and (self.cache / f"search-{former}" / "genotype.json").is_file():
            key = former
        return self._stage("search", key, "genotype.json",
                           lambda folder, resume: search(config, folder, resume=resume, force=not resume, quiet=self.quiet))

    def train(self, row: str, dataset: str, seed: int) -> Path:
        searched = self.search(row, dataset, seed)
        config = TrainConfig(**self.scale.train, genotype=str(searched / "genotype.json"), data=self._data(dataset),
                             data_root=self._root(dataset), image_size=self.scale.image_size, seed=seed,
                             device=self.device)
        return self._train_stage("train", config, searched)

    def _train_stage(self, stage: str, config: TrainConfig, searched: Path) -> Path:
        # The genotype path is where this clone keeps its cache: the key names the search stage instead,
        # so a moved or cloned results folder keeps its cache.
        key = config_hash(stage, {**stage_settings(config), "genotype": None}, searched.name)
        folder = self.cache / f"{stage}-{key}"

        def run(out: Path, resume: bool):
            return train(config, out, resume=resume, force=not resume, quiet=self.quiet)
        if not (folder / "model.pt").is_file() and (folder / "summary.json").is_file() and (folder / "stage.json").is_file():
            # a finished stage whose model file is not in this clone (model files are not committed): its
            # evaluations are read from the cache, and it is trained again only where one must run (ensure_model)
            def retrain() -> Path:
                # from the start, as a fresh clone does: a checkpoint left by the finished run would resume it
                # with the settings of then
                (folder / "checkpoint.pt").unlink(missing_ok=True)
                return self._stage(stage, key, "model.pt", run)
            self._retrain[folder / "model.pt"] = retrain
            return folder
        return self._stage(stage, key, "model.pt", run)

    def ensure_model(self, model: Path) -> None:
        """Train ``model`` again if its file is not here. The retrained network is not bit-identical to the one
        the cached evaluations measured, so its evaluations are keyed by its own digest and all run again."""
        retrain = self._retrain.pop(Path(model), None)
        if retrain is not None and not Path(model).is_file():
            retrain()

    def attack(self, model: Path, dataset: str, norm: str, cached_only: bool = False) -> Optional[Dict[str, Any]]:
        """The attacks of ``norm`` at the scale's eps; ``cached_only``: None unless the stage is in the cache."""
        attacks = ("fgsm", "pgd", "cw") if norm == "inf" else ("autoattack",)
        config = AttackConfig(attacks=attacks, eps=self.scale.eps[dataset][norm], norm=norm, steps=self.scale.attack_steps,
                              n=self.scale.attack_n, autoattack_version=self.scale.autoattack_version,
                              data_root=self._root(dataset), device=self.device)
        return self._attack_stage(config, model, cached_only)

    def _attack_stage(self, config: AttackConfig, model: Path, cached_only: bool = False) -> Optional[Dict[str, Any]]:
        folder = self._evaluation("attack", lambda: config_hash("attack", asdict(config), _model_key(model)), "attack.json",
                                  lambda out, resume: run_attacks(config, model, out, quiet=self.quiet), model, cached_only)
        return None if folder is None else json.loads((folder / "attack.json").read_text())

    def _evaluation(self, stage: str, key, marker: str, run, model: Path, cached_only: bool) -> Optional[Path]:
        """The folder of a stage evaluating ``model`` (``key()`` names it): from the cache, else None where
        ``cached_only``, else run (the model trained again first if its file is not here, which changes the key)."""
        folder = cached(self.cache, stage, key(), marker, evaluated(model))
        if folder is not None or cached_only:
            return folder
        self.ensure_model(model)
        return self._stage(stage, key(), marker, run, model)

    def verify(self, model: Path, dataset: str, norm: str, methods=("ibp", "crown-ibp"),
               n: Optional[int] = None, device: Optional[str] = None,
               cached_only: bool = False) -> Optional[Dict[str, Any]]:
        """Verified accuracy at the scale's eps and certified radii of ``methods`` on ``n`` (default
        ``verify_n``) test samples; with ``crown`` in ``methods``, no network size limit applies.
        ``cached_only``: None unless the stage is already in the cache."""
        crown = "crown" in methods  # radii only, its accuracy read off them at crown_verify_eps
        config = VerifyConfig(methods=tuple(methods), norm=norm, n=self.scale.verify_n if n is None else n,
                              eps=(self.scale.crown_verify_eps if crown else self.scale.verify_eps)[dataset][norm],
                              radius=True, radius_max=self.scale.radius_max[norm], radius_steps=self.scale.radius_steps,
                              radius_min=self.scale.radius_min,
                              pgd_steps=self.scale.verify_pgd_steps, data_root=self._root(dataset),
                              device=device or self.device, **({"crown_max_relus": 0, "at_eps": False} if crown else {}))
        folder = self._evaluation("verify", lambda: config_hash("verify", asdict(config), _model_key(model)), "verify.json",
                                  lambda out, resume: run_verify(config, model, out, quiet=self.quiet), model, cached_only)
        if folder is None:
            return None
        stamp = folder / "stage.json"
        seconds = json.loads(stamp.read_text()).get("seconds") if stamp.is_file() else None
        return {"summary": json.loads((folder / "verify.json").read_text()), "csv": folder / "verify.csv",
                "seconds": seconds}

    def transfer(self, row: str, seed: int) -> Dict[str, Any]:
        """The row's CIFAR-10 cell trained on ImageNet, then FGSM / PGD at the scale's ImageNet eps."""
        searched = self.search(row, "cifar10", seed)
        settings = {**self.scale.train, **self.scale.imagenet["train"]}
        config = TrainConfig(**settings, genotype=str(searched / "genotype.json"), data="imagenet",
                             data_root=self._root("imagenet"), image_size=self._image_size("imagenet"), seed=seed,
                             device=self.device)
        trained = self._train_stage("transfer", config, searched)
        attack = AttackConfig(attacks=("fgsm", "pgd"), eps=self.scale.imagenet["eps"], norm="inf",
                              steps=self.scale.attack_steps, n=self.scale.attack_n, data_root=self._root("imagenet"),
                              device=self.device)
        if self._attack_stage(attack, trained / "model.pt", cached_only=True) is None:
            self.ensure_model(trained / "model.pt")
        summary = json.loads((trained / "summary.json").read_text())
        record: Dict[str, Any] = {"row": row, "dataset": "imagenet", "seed": seed, "scale": self.scale.name,
                                  "cell_searched_on": "cifar10", "train_test_acc": summary["test_acc"],
                                  "train_test_top5_acc": summary.get("test_top5_acc"),
                                  "test_samples": summary["test_samples"]}
        for result in self._attack_stage(attack, trained / "model.pt")["results"]:
            record[f"attack_{result['attack']}_inf"] = result["robust_accuracy"]
        return record

    def record(self, row: str, dataset: str, seed: int, attacks: bool = True) -> Dict[str, Any]:
        """One row, seed and dataset through the whole pipeline; returns its record (without the attack
        stage and its ``attack_*`` values where ``attacks`` is False: only the game tables need them)."""
        searched = self.search(row, dataset, seed)
        trained = self.train(row, dataset, seed)
        if not self._evaluated(trained / "model.pt", dataset, seed, attacks):
            self.ensure_model(trained / "model.pt")  # one network behind every value of the record
        record: Dict[str, Any] = {"row": row, "dataset": dataset, "seed": seed, "scale": self.scale.name,
                                  "search_seconds": json.loads((searched / "stage.json").read_text())["seconds"]
                                  if (searched / "stage.json").is_file() else None,
                                  "genotype": json.loads((searched / "genotype.json").read_text())["normal"],
                                  "train_test_acc": json.loads((trained / "summary.json").read_text())["test_acc"]}
        for norm in ("inf", "2"):
            for result in self.attack(trained / "model.pt", dataset, norm)["results"] if attacks else ():
                record[f"attack_{result['attack']}_{norm}"] = result["robust_accuracy"]
            verified = self.verify(trained / "model.pt", dataset, norm)
            record[f"radius_{norm}"] = verified["summary"]["radius"]
            record[f"radius_csv_{norm}"] = str(verified["csv"].relative_to(self.out))
            crown = None
            if self._crown_seed(seed):
                crown = self.verify(trained / "model.pt", dataset, norm, methods=("crown",), n=self.scale.crown_n,
                                    device=self.crown_device, cached_only=self.crown_cached_only)
            if crown is not None:
                record[f"radius_{norm}"]["crown"] = crown["summary"]["radius"]["crown"]
                record[f"crown_csv_{norm}"] = str(crown["csv"].relative_to(self.out))
                record["crown_n"] = self.scale.crown_n
                record[f"crown_eps_{norm}"] = self.scale.crown_verify_eps[dataset][norm]
                record[f"crown_seconds_{norm}"] = crown["seconds"]
            record[f"verify_eps_{norm}"] = self.scale.verify_eps[dataset][norm]
            record[f"clean_{norm}"] = next(r["accuracy"] for r in verified["summary"]["results"] if r["method"] == "clean")
        return record

    def _crown_seed(self, seed: int) -> bool:
        """Whether the CROWN column covers this seed (its stage then read, and run unless crown_cached_only)."""
        return bool(self.scale.crown_n) and (self.crown_seeds is None or seed < self.crown_seeds)

    def _evaluated(self, model: Path, dataset: str, seed: int, attacks: bool) -> bool:
        """Whether every stage a record of ``model`` needs is already in the cache."""
        for norm in ("inf", "2"):
            if attacks and self.attack(model, dataset, norm, cached_only=True) is None:
                return False
            if self.verify(model, dataset, norm, cached_only=True) is None:
                return False
            if self._crown_seed(seed) and not self.crown_cached_only and self.verify(model, dataset, norm, methods=("crown",), n=self.scale.crown_n,
                                                        device=self.crown_device, cached_only=True) is None:
                return False
        return True

    def _image_size(self, name: str) -> int:
        return self.scale.imagenet["image_size"] if name == "imagenet" else self.scale.image_size

    def _data(self, dataset: str) -> str:
        return self.scale.mnist if dataset == "mnist" else dataset

    def _root(self, dataset: str) -> Optional[str]:
        return None if self._data(dataset) == "mnist-embedded" else (str(self.data_root) if self.data_root else None)
