"""Training: every mode writes a model file the evaluators accept; schedule; resume; certified training works."""
import csv
import json
from dataclasses import replace

import pytest
import torch

from certnas import train as train_module
from certnas.config import ConfigError
from certnas.io import load_model_with_meta
from certnas.search import search
from certnas.space.genotype import GenotypeError
from certnas.train import TrainConfig, schedule, train
from tests.certnas.test_search import TINY as TINY_SEARCH
from tests.interrupt import run_interrupted
from verifiers.bounds import margin_lower_bound

TINY = TrainConfig(layers=3, stem="cifar", init_channels=4, batch_size=16, train_limit=32, eval_limit=40, epochs=2,
                   warmup_epochs=0, ramp_epochs=1, eps=0.05, genotype="DARTS_V2", max_loss=0)


@pytest.mark.parametrize("mode", ["standard", "pgd", "ibp", "crown-ibp"])
def test_every_mode_writes_a_model_file_in_eval_mode(tmp_path, mode):
    summary = train(replace(TINY, mode=mode, pgd_steps=2), tmp_path / "run", quiet=True)
    model, meta = load_model_with_meta(tmp_path / "run" / "model.pt")
    assert not model.training and meta["training"]["mode"] == mode and meta["dataset"]["name"] == "mnist-embedded"
    assert meta["summary"]["test_acc"] == summary["test_acc"] and "auto_LiRPA" in meta["versions"]
    rows = list(csv.DictReader(open(tmp_path / "run" / "history.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"] and all(v != "nan" for r in rows for v in r.values())
    if mode in ("ibp", "crown-ibp"):
        assert "robust_loss" in rows[0] and float(rows[-1]["eps"]) == pytest.approx(0.05)
    x = torch.rand(2, 1, 28, 28)
    margin_lower_bound(model, x, torch.tensor([0, 1]), 0.01, method="crown-ibp")  # the verifier accepts it


@pytest.mark.slow
def test_a_searched_genotype_trains(tmp_path):
    search(replace(TINY_SEARCH, epochs=1, warmup_epochs=0, steps=4, multiplier=4), tmp_path / "search", quiet=True)
    # the tiny search has no reduction cell (see certnas.space.genotype), so the network has none either
    train(replace(TINY, genotype=str(tmp_path / "search" / "genotype.json"), epochs=1, layers=2), tmp_path / "run",
          quiet=True)
    _, meta = load_model_with_meta(tmp_path / "run" / "model.pt")
    saved = json.loads((tmp_path / "search" / "genotype.json").read_text())
    assert meta["network"]["genotype"]["normal"] == saved["normal"]


def test_schedule_warms_up_then_ramps_linearly():
    config = TrainConfig(mode="crown-ibp", eps=0.3, warmup_epochs=1, ramp_epochs=2, kappa_end=0.5, beta_start=1.0,
                         beta_end=0.0)
    plans = [schedule(config, step, 10) for step in range(40)]
    assert all(p["eps"] == 0 and p["kappa"] == 1 and p["beta"] == 1 for p in plans[:10])
    eps = [p["eps"] for p in plans[10:30]]
    assert eps == sorted(eps) and eps[0] > 0 and eps[-1] == pytest.approx(0.3)
    assert all(p["eps"] == pytest.approx(0.3) and p["kappa"] == pytest.approx(0.5) and p["beta"] == 0 for p in plans[30:])
    assert schedule(replace(config, mode="standard"), 35, 10)["eps"] == 0


def test_interrupted_training_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    config = replace(TINY, mode="ibp")
    train(config, tmp_path / "full", quiet=True)
    run_interrupted(monkeypatch, train_module.Trainer, "step", 3, lambda: train(config, tmp_path / "cut", quiet=True))
    assert not (tmp_path / "cut" / "model.pt").exists()
    train(config, tmp_path / "cut", resume=True, quiet=True)
    a = load_model_with_meta(tmp_path / "full" / "model.pt")[0].state_dict()
    b = load_model_with_meta(tmp_path / "cut" / "model.pt")[0].state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="settings differ"):
        train(replace(config, eps=0.1), tmp_path / "cut", resume=True, quiet=True)


@pytest.mark.parametrize("change,error,message", [
    ({"mode": "trades"}, ConfigError, "unknown mode"), ({"mode": "ibp", "drop_path": 0.2}, ConfigError, "drop-path"),
    ({"genotype": "NOPE"}, GenotypeError, "neither a file"), ({"network": "mlp", "hidden": ()}, ConfigError, "hidden"),
    ({"network": "darts", "layers": 3, "stem": "strided"}, ConfigError, "cell 2 .* 7x7 maps"),
    ({"network": "cnn", "cnn": "c16k4"}, ConfigError, "--cnn"), ({"network": "cnn", "cnn": "f100"}, ConfigError, "--cnn"),
    ({"network": "cnn", "cnn": "f10,c8k3s1"}, ConfigError, "convolutions first"),
    ({"network": "cnn", "cnn": "c0k3s1"}, ConfigError, ">= 1"),
    ({"network": "cnn", "cnn": "c4k4s2,c4k4s2,c4k4s2,c4k4s2,c4k4s2"}, ConfigError, "to nothing"),
])
def test_invalid_training_settings_are_refused(tmp_path, change, error, message):
    with pytest.raises(error, match=message):
        train(replace(TINY, **change), tmp_path / "run", quiet=True)


@pytest.mark.slow
def test_ibp_training_certifies_more_samples_than_standard_training(tmp_path):
    """The point of certified training: at the training eps, IBP-trained MLPs are verifiable."""
    base = TrainConfig(network="mlp", hidden=(64,), epochs=3, warmup_epochs=0, ramp_epochs=2, eps=0.05,
                       train_limit=2000, eval_limit=200, lr=0.05)
    fractions = {}
    for mode in ("standard", "ibp"):
        train(replace(base, mode=mode), tmp_path / mode, quiet=True)
        model, _ = load_model_with_meta(tmp_path / mode / "model.pt")
        from certnas.evaluation import prepare
        evaluation = prepare(tmp_path / mode / "model.pt", data=None, data_root=None, n=200, seed=0, device="cpu")
        bound = margin_lower_bound(model, evaluation.x, evaluation.y, 0.05, method="ibp")
        fractions[mode] = (bound > 0).float().mean().item()
    assert fractions["ibp"] > fractions["standard"] + 0.2, fractions


def test_topk_accuracies_match_a_direct_count_in_one_pass():
    import torch.nn as nn
    from torch.utils.data import TensorDataset
    from certnas.train import accuracy, topk_accuracies
    torch.manual_seed(0)
    model, x, y = nn.Linear(5, 8), torch.randn(37, 5), torch.randint(0, 8, (37,))
    ranks = (model(x).argsort(1, descending=True) == y[:, None]).float().argmax(1)  # rank of the true class
    result = topk_accuracies(model, TensorDataset(x, y), "cpu", batch_size=10, ks=(1, 3, 5))
    assert result == pytest.approx({k: (ranks < k).float().mean().item() for k in (1, 3, 5)})
    assert accuracy(model, TensorDataset(x, y), "cpu") == result[1]


def test_smooth_and_log_ramps_start_slowly_rise_monotonically_and_reach_the_training_eps():
    from certnas.train import smooth_ramp
    shares = [smooth_ramp(p / 100) for p in range(101)]
    assert shares[0] == 0 and shares[-1] == pytest.approx(1.0) and shares == sorted(shares)
    assert max(b - a for a, b in zip(shares, shares[1:])) < 0.02  # no jump at the knee
    assert smooth_ramp(0.25) < 0.1  # a quarter of the ramp reaches less than a tenth of eps
    config = TrainConfig(mode="ibp", eps=0.1, eps_train=0.2, warmup_epochs=1, ramp_epochs=2, eps_schedule="log",
                         eps_start=1e-5)
    eps = [schedule(config, step, 10)["eps"] for step in range(40)]
    assert eps[:10] == [0.0] * 10 and eps[10] > 1e-5 and eps[29:] == [pytest.approx(0.2)] * 11
    ratios = [b / a for a, b in zip(eps[10:29], eps[11:30])]
    assert max(ratios) == pytest.approx(min(ratios))  # equal steps in log space


def test_a_diverging_run_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    from certnas.train import TrainingDivergedError
    config = replace(TINY, mode="ibp", epochs=3, warmup_epochs=1, ramp_epochs=1, eps=0.3, max_loss=50)
    with pytest.raises(TrainingDivergedError, match=r"diverged in epoch 2, batch 1: loss .* at eps .*checkpoint of epoch 1 is kept"):
        train(config, tmp_path / "run", quiet=True)
    assert (tmp_path / "run" / "checkpoint.pt").is_file() and not (tmp_path / "run" / "model.pt").exists()
    rows = list(csv.DictReader(open(tmp_path / "run" / "history.csv")))
    assert [r["epoch"] for r in rows] == ["1"]
    from click.testing import CliRunner
    from certnas.cli import main
    result = CliRunner().invoke(main, ["-q", "train", "--mode", "ibp", "--layers", "3", "--stem", "cifar", "--init-channels", "4",
                                       "--epochs", "2", "--warmup-epochs", "0", "--ramp-epochs", "0", "--eps", "0.3",
                                       "--train-limit", "32", "--batch-size", "16", "--max-loss", "1e-3",
                                       "--out", str(tmp_path / "cli")])
    assert result.exit_code != 0 and result.output.count("\n") == 1 and "diverged in epoch 1" in result.output
    assert "no epoch completed" in result.output


def test_a_non_finite_loss_is_caught_whatever_max_loss_says(tmp_path, monkeypatch):
    from certnas.train import TrainingDivergedError
    original = train_module.Trainer.loss

    def poisoned(self, x, y, plan):
        loss, details = original(self, x, y, plan)
        return loss * float("nan"), {**details, "train_loss": float("nan")}

    monkeypatch.setattr(train_module.Trainer, "loss", poisoned)
    with pytest.raises(TrainingDivergedError, match="loss nan"):
        train(replace(TINY, max_loss=0), tmp_path / "run", quiet=True)


def test_a_short_certified_run_lowers_its_robust_loss(tmp_path):
    # (with no ramp at all, eps 0.05 from the first step collapsed this MLP to a constant classifier under
    # every optimiser tried: the ramp is part of the recipe)
    config = TrainConfig(network="mlp", hidden=(64,), mode="ibp", eps=0.05, epochs=6, warmup_epochs=0,
                         ramp_epochs=2, train_limit=1000, eval_limit=200, reg_weight=0.0)
    summary = train(config, tmp_path / "run", quiet=True)
    rows = list(csv.DictReader(open(tmp_path / "run" / "history.csv")))
    full = [float(r["robust_loss"]) for r in rows if float(r["eps"]) == pytest.approx(0.05)]
    assert len(full) == 5 and full[-1] < full[0] * 0.8, full  # lower at the same eps
    assert summary["test_ibp_verified"] > 0 and summary["test_crown-ibp_verified"] >= summary["test_ibp_verified"] - 0.05
    assert summary["warnings"] == []


def test_a_run_that_certifies_nothing_says_so_in_its_summary(tmp_path):
    config = replace(TINY, mode="ibp", eps=1.0, epochs=2, warmup_epochs=0, ramp_epochs=1, max_loss=0)
    summary = train(config, tmp_path / "run", quiet=True)
    assert summary["test_ibp_verified"] == 0
    assert any("stayed 0 after the eps ramp" in w for w in summary["warnings"])
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["warnings"] == summary["warnings"]


def test_cnn_presets_and_lists_reach_the_trained_network(tmp_path):
    """--network cnn: a preset name or a layer list becomes the saved network's layers, which load back safely."""
    from certnas.io import load_model_with_meta
    from certnas.train import CNN_PRESETS, cnn_layers
    assert cnn_layers("small") == (((16, 4, 2), (32, 4, 1)), (100,))
    assert cnn_layers("c8k3s1, c4k4s2,f12,f7") == (((8, 3, 1), (4, 4, 2)), (12, 7))
    assert set(CNN_PRESETS) == {"small", "medium", "large"}
    train(replace(TINY, network="cnn", cnn="c4k3s2,f8"), tmp_path / "run", quiet=True)
    model, _ = load_model_with_meta(tmp_path / "run" / "model.pt")
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(c.out_channels, c.kernel_size, c.stride) for c in convs] == [(4, (3, 3), (2, 2))]
    assert [m.out_features for m in linears] == [8, 10]


def test_after_the_ramp_a_network_without_batch_norm_skips_the_clean_pass_with_the_same_loss():
    """kappa 0 (the clean loss has weight 0): the cnn's step computes only the boxes (train_acc is NaN) and its
    loss and gradients equal the robust loss of a bound pass with the clean value; batch norm keeps the pass."""
    import math
    import torch.nn.functional as F
    from certnas.data import INFO
    from certnas.train import Trainer, network_config, training_loss
    from verifiers.interval import interval_margins
    x, y = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 10
    plan = {"eps": 0.05, "kappa": 0.0, "beta": 0.0, "progress": 1.0}
    config = replace(TINY, network="cnn", cnn="c4k3s2,f8", mode="ibp")
    model = Trainer(config, network_config(config, INFO["mnist-embedded"])).model.train()
    loss, details = training_loss(model, x, y, plan, config)
    assert math.isnan(details["train_acc"]) and math.isfinite(details["train_loss"])
    reference = F.cross_entropy(-interval_margins(model, x, y, 0.05, clean=True).ibp, y)
    params = list(model.parameters())
    for a, b in zip(torch.autograd.grad(loss, params), torch.autograd.grad(reference, params)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    _, details = training_loss(model, x, y, {**plan, "kappa": 0.5}, config)
    assert 0 <= details["train_acc"] <= 1  # a clean loss to compute: the pass stays
    darts = replace(TINY, mode="ibp")
    model = Trainer(darts, network_config(darts, INFO["mnist-embedded"])).model.train()
    _, details = training_loss(model, x, y, plan, darts)  # training-mode batch norm needs the clean batch
    assert 0 <= details["train_acc"] <= 1
