"""certnas attack: eps 0 is clean accuracy, more PGD steps are never weaker, examples stay in the ball."""
import json

import pytest
import torch

from certnas.attack_eval import AttackConfig, robust_flags, run_attacks
from certnas.data import DataError
from certnas.evaluation import prepare, sample_indices
from certnas.io import ModelFileError
from certnas.train import TrainConfig, train


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("attack") / "run"
    train(TrainConfig(network="mlp", hidden=(32,), epochs=2, train_limit=1000, eval_limit=100, lr=0.05), out, quiet=True)
    return out / "model.pt"


def test_robust_accuracy_at_eps_zero_equals_clean_accuracy(model_file, tmp_path):
    summary = run_attacks(AttackConfig(attacks=("fgsm", "pgd", "cw"), eps=0.0, steps=5, n=100), model_file, tmp_path)
    accuracy = {row["attack"]: row["robust_accuracy"] for row in summary["results"]}
    assert accuracy["clean"] > 0.5
    assert accuracy["fgsm"] == accuracy["pgd"] == accuracy["cw"] == accuracy["worst-case"] == accuracy["clean"]
    for name in ("attack.csv", "attack_samples.csv", "attack.json"):
        assert (tmp_path / name).is_file()
    assert json.loads((tmp_path / "attack.json").read_text())["settings"]["eps"] == 0.0


@pytest.mark.parametrize("norm,eps", [("inf", 0.1), ("2", 1.0)])
def test_more_pgd_steps_are_never_weaker_than_one(model_file, norm, eps):
    evaluation = prepare(model_file, data=None, data_root=None, n=200, seed=0, device="cpu")
    one = robust_flags(evaluation, "pgd", AttackConfig(eps=eps, norm=norm, steps=1))
    many = robust_flags(evaluation, "pgd", AttackConfig(eps=eps, norm=norm, steps=50))
    assert many.sum() <= one.sum() + 2  # beyond noise: at most 1% of 200


def test_worst_case_is_no_higher_than_any_attack_and_attacks_no_higher_than_clean(model_file, tmp_path):
    summary = run_attacks(AttackConfig(attacks=("fgsm", "pgd", "autoattack"), eps=0.1, steps=10, n=60,
                                       autoattack_version="fast"), model_file, tmp_path)
    accuracy = {row["attack"]: row["robust_accuracy"] for row in summary["results"]}
    for name in ("fgsm", "pgd", "autoattack"):
        assert accuracy["worst-case"] <= accuracy[name] <= accuracy["clean"]


def test_same_seed_draws_the_same_samples_and_bad_n_is_refused(model_file):
    assert torch.equal(sample_indices(1000, 50, 3), sample_indices(1000, 50, 3))
    assert not torch.equal(sample_indices(1000, 50, 3), sample_indices(1000, 50, 4))
    with pytest.raises(DataError, match="larger than"):
        prepare(model_file, data=None, data_root=None, n=5000, seed=0, device="cpu")


def test_data_that_does_not_fit_the_model_is_refused(model_file, tmp_path):
    from tests.certnas.datafiles import write_cifar10
    root = write_cifar10(tmp_path / "data")
    with pytest.raises(DataError, match="the model expects"):
        prepare(model_file, data="cifar10", data_root=root, n=5, seed=0, device="cpu")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ModelFileError):
        prepare(tmp_path / "junk.pt", data=None, data_root=None, n=5, seed=0, device="cpu")
