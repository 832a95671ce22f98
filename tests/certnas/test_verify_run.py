"""certnas verify on trained model files: certified <= PGD <= clean; files; the DARTS network skips CROWN."""
import csv
import json

import pytest

from certnas.train import TrainConfig, train
from certnas.verify_run import VerifyConfig, run_verify
from verifiers.errors import UnsupportedModelError


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    train(TrainConfig(network="mlp", hidden=(24,), mode="ibp", eps=0.05, epochs=2, warmup_epochs=0, ramp_epochs=1,
                      train_limit=1000, eval_limit=100, lr=0.05), root / "mlp", quiet=True)
    train(TrainConfig(layers=2, init_channels=4, mode="ibp", eps=0.02, epochs=1, warmup_epochs=0, ramp_epochs=1,
                      train_limit=64, batch_size=32, eval_limit=50), root / "darts", quiet=True)
    return {"mlp": root / "mlp" / "model.pt", "darts": root / "darts" / "model.pt"}


@pytest.mark.parametrize("methods", [("all",), ("ibp", "crown-ibp", "crown", "milp")])
def test_certified_accuracy_is_at_most_pgd_accuracy_at_most_clean(models, tmp_path, methods):
    summary = run_verify(VerifyConfig(methods=methods, eps=0.02, n=40, milp_time_limit=20), models["mlp"], tmp_path,
                         quiet=True)
    accuracy = {row["method"]: row["accuracy"] for row in summary["results"]}
    verified = [v for k, v in accuracy.items() if k not in ("clean", "pgd-50")]
    assert accuracy["pgd-50"] <= accuracy["clean"]
    assert all(v <= accuracy["pgd-50"] for v in verified)
    assert max(verified) > 0  # the IBP-trained MLP is verifiable at 0.02
    assert json.loads((tmp_path / "verify.json").read_text())["settings"]["eps"] == 0.02


def test_radius_rows_and_the_attack_radius_bound_them(models, tmp_path):
    import pandas as pd
    summary = run_verify(VerifyConfig(methods=("ibp", "crown-ibp"), eps=0.02, n=20, radius=True, radius_steps=8),
                         models["mlp"], tmp_path, quiet=True)
    rows = pd.read_csv(tmp_path / "verify.csv")
    radius = rows[rows["mode"] == "radius"].pivot(index="index", columns="method", values="radius")
    assert (radius["ibp"] <= radius["pgd-50"] + 1e-9).all() and (radius["crown-ibp"] <= radius["pgd-50"] + 1e-9).all()
    assert summary["radius"]["crown-ibp"]["mean"] > 0


def test_darts_network_is_verified_by_ibp_and_crown_ibp_and_crown_is_refused_or_skipped(models, tmp_path):
    summary = run_verify(VerifyConfig(methods=("all",), eps=0.005, n=10, crown_max_relus=1000), models["darts"],
                         tmp_path, quiet=True)
    assert set(summary["skipped"]) == {"crown", "alpha-crown", "bab", "milp"}
    with pytest.raises(UnsupportedModelError, match="crown-max-relus"):
        run_verify(VerifyConfig(methods=("crown",), eps=0.005, n=4, crown_max_relus=1000), models["darts"], tmp_path,
                   quiet=True)


def test_crown_verifies_the_darts_network_at_the_default_limit_and_is_at_least_as_tight_as_crown_ibp(models, tmp_path):
    summary = run_verify(VerifyConfig(methods=("crown-ibp", "crown"), eps=0.005, n=4), models["darts"],
                         tmp_path / "crown", quiet=True)
    rows = list(csv.DictReader((tmp_path / "crown" / "verify.csv").open()))
    bound = {(row["index"], row["method"]): float(row["margin_bound"]) for row in rows}
    assert {method for _, method in bound} == {"crown-ibp", "crown"} and not summary["skipped"]
    for index in {index for index, _ in bound}:
        assert bound[(index, "crown")] >= bound[(index, "crown-ibp")] - 1e-4
    with pytest.raises(UnsupportedModelError, match="MILP supports"):
        run_verify(VerifyConfig(methods=("milp",), eps=0.005, n=4), models["darts"], tmp_path, quiet=True)


def _without_timings(path):
    import pandas as pd
    frame = pd.read_csv(path / "verify.csv").drop(columns=["seconds"])
    summary = json.loads((path / "verify.json").read_text())
    for row in summary["results"]:
        row.pop("seconds_per_sample", None)
    summary.pop("versions")
    return frame, summary


def _assert_same_files(one, other):
    """Equal verify.csv / verify.json but for timings; bounds to float rounding (a batch of another
    size sums in another order)."""
    import pandas as pd
    (frame, summary), (other_frame, other_summary) = _without_timings(one), _without_timings(other)
    pd.testing.assert_frame_equal(frame, other_frame, check_exact=False, rtol=1e-5, atol=1e-6)
    assert _approx_equal(summary, other_summary), (summary, other_summary)


def _approx_equal(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_approx_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_approx_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, (int, float)):
        return b == pytest.approx(a, rel=1e-5, abs=1e-7)
    return a == b


@pytest.mark.parametrize("methods,radius", [(("all",), False), (("ibp", "crown-ibp"), True)])
def test_shards_merge_into_the_files_of_one_run(models, tmp_path, methods, radius):
    config = VerifyConfig(methods=methods, eps=0.02, n=23, radius=radius, radius_steps=6, pgd_steps=10)
    run_verify(config, models["mlp"], tmp_path / "one", quiet=True)
    waiting = run_verify(config, models["mlp"], tmp_path / "sharded", quiet=True, shard=(2, 3))
    assert "waiting_for" in waiting and not (tmp_path / "sharded" / "verify.csv").exists()
    run_verify(config, models["mlp"], tmp_path / "sharded", quiet=True, shard=(0, 3))
    run_verify(config, models["mlp"], tmp_path / "sharded", quiet=True, shard=(1, 3))  # the last one merges
    _assert_same_files(tmp_path / "one", tmp_path / "sharded")


def test_a_shard_with_other_settings_is_refused(models, tmp_path):
    from certnas.config import ConfigError
    run_verify(VerifyConfig(eps=0.02, n=6, pgd_steps=5), models["mlp"], tmp_path, quiet=True, shard=(0, 2))
    with pytest.raises(ConfigError, match="different settings"):
        run_verify(VerifyConfig(eps=0.03, n=6, pgd_steps=5), models["mlp"], tmp_path, quiet=True, shard=(1, 2))


@pytest.mark.slow
def test_two_gloo_processes_verify_into_the_files_of_one(models, tmp_path):
    from tests.certnas.test_distributed import _torchrun
    args = ["verify", str(models["mlp"]), "--eps", "0.02", "--n", "17", "--pgd-steps", "10"]
    one = _torchrun(1, args + ["--out", str(tmp_path / "one")])
    two = _torchrun(2, args + ["--out", str(tmp_path / "two")])
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    _assert_same_files(tmp_path / "one", tmp_path / "two")


def test_verify_json_counts_the_margins_rechecked_in_float64_and_shards_sum_them(models, tmp_path, monkeypatch):
    """With the float32 tolerance raised above every margin, each positive margin is rechecked in float64
    (a real recomputation) and confirmed: the counts equal the certified counts, also when sharded."""
    import verifiers.rounding
    monkeypatch.setattr(verifiers.rounding, "RTOL", 1e3)
    config = VerifyConfig(methods=("ibp", "crown-ibp"), eps=0.02, n=23, pgd_steps=5)
    summary = run_verify(config, models["mlp"], tmp_path / "one", quiet=True)
    certified = {row["method"]: round(row["accuracy"] * 23) for row in summary["results"]}
    assert certified["ibp"] > 0
    assert summary["rounding"] == {m: {"rechecked": certified[m], "rejected": 0} for m in ("ibp", "crown-ibp")}
    for i in range(2):
        sharded = run_verify(config, models["mlp"], tmp_path / "sharded", quiet=True, shard=(i, 2))
    assert sharded["rounding"] == summary["rounding"]


@pytest.mark.parametrize("cls_path", ["certnas.search:SearchConfig", "certnas.train:TrainConfig",
                                      "certnas.attack_eval:AttackConfig", "certnas.verify_run:VerifyConfig"])
def test_every_declared_choice_is_checked_from_its_declaration(cls_path):
    """certnas.config.check_choices: a value outside a setting's declared choices is one ConfigError naming
    it, for every such setting of every command's configuration (nothing re-checked by hand)."""
    import dataclasses
    import importlib
    from certnas.config import ConfigError
    module, name = cls_path.split(":")
    cls = getattr(importlib.import_module(module), name)
    declared = [f for f in dataclasses.fields(cls) if f.metadata.get("choices")]
    assert declared
    for field in declared:
        bad = ("no-such-choice",) if field.metadata.get("kind") == "list" else "no-such-choice"
        config = dataclasses.replace(cls(), **{field.name: bad})
        with pytest.raises(ConfigError, match=f"unknown {field.name.replace('_', ' ')} 'no-such-choice'; known: "):
            config.validate()


def test_the_guard_attack_is_run_once_per_sample_and_eps_and_a_planted_break_is_still_caught(models):
    """verify attacks every digit first and each bound method's guard attacks its certified digits again: the
    second attack is the first one's result (forward passes counted), a new eps attacks again, and a method
    certifying a digit the attack breaks still raises SoundnessError. The radius search's attack keeps nothing."""
    import torch
    import torch.nn as nn
    from certnas.io import load_model
    from certnas.verify_run import falsifier_for
    from verifiers.verify import SoundnessError, guard
    model = load_model(models["mlp"])
    calls = []

    class Counting(nn.Module):
        def forward(self, x):
            calls.append(len(x))
            return model(x)

    attack = falsifier_for(Counting(), VerifyConfig(eps=0.3, pgd_steps=5, batch_size=8))
    x, y = torch.rand(12, 1, 28, 28, generator=torch.Generator().manual_seed(0)), torch.arange(12) % 10
    eps = torch.full((12,), 0.3)
    first = attack(x, y, eps)
    runs = len(calls)
    assert runs > 0 and max(calls) <= 8
    again = attack(x[[3, 1, 7]], y[[3, 1, 7]], eps[[3, 1, 7]])
    assert len(calls) == runs and torch.equal(again, first[[3, 1, 7]])          # no attack ran
    attack(x[:2], y[:2], torch.full((2,), 0.2))
    assert len(calls) > runs                                                     # another eps is attacked
    with torch.no_grad():
        broken = model(first).argmax(1) != y
    assert bool(broken.any())                            # eps 0.3 breaks random pixels with arbitrary labels
    with pytest.raises(SoundnessError):
        guard(model, x, y, eps, broken, "ibp", list(range(12)), attack)          # a planted false certificate
    forgetful = falsifier_for(Counting(), VerifyConfig(eps=0.3, pgd_steps=5, batch_size=8), remember=False)
    before = len(calls)
    once = forgetful(x[:4], y[:4], eps[:4])
    between = len(calls)
    twice = forgetful(x[:4], y[:4], eps[:4])
    assert between > before and len(calls) - between == between - before      # attacked again, nothing kept
    assert torch.equal(once, twice)                                              # the same seeded attack
