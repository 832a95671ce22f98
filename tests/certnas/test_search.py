"""The search runs for every metric, is reproducible, resumes exactly, and writes its files."""
import csv
import json
from dataclasses import asdict, replace

import pytest

from certnas import search as search_module
from certnas.config import ConfigError
from certnas.io import load_file
from certnas.runs import RunFolderError
from certnas.search import SearchConfig, search
from certnas.space.genotype import Genotype
from tests.interrupt import run_interrupted

TINY = SearchConfig(layers=2, init_channels=4, steps=2, multiplier=2, batch_size=8, train_limit=16, val_limit=16, epochs=2,
                    metric_samples=4, bound="ibp", term="clb")  # weight steps: 1 clean epoch, then IBP


def test_search_writes_genotype_history_checkpoint_and_pictures(tmp_path):
    record = search(TINY, tmp_path / "run", quiet=True)
    out = tmp_path / "run"
    genotype = Genotype.from_dict(json.loads((out / "genotype.json").read_text()))
    assert genotype == Genotype.from_dict(record)
    saved = json.loads((out / "genotype.json").read_text())
    assert saved["settings"]["term"] == "clb" and saved["settings"]["strategy"] == "darts" and saved["seed"] == 0 and "torch" in saved["versions"]
    assert len(saved["arch_weights"]["normal"]) == 5  # edges of a 2-node cell
    rows = list(csv.DictReader(open(out / "history.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for column in ("train_loss", "val_acc", "R", "clb_margin", "arch_entropy", "seconds", "grad_val", "grad_gamma_R"):
        assert column in rows[0]
    assert float(rows[0]["eps"]) == 0 and float(rows[1]["eps"]) == pytest.approx(TINY.eps)  # warm-up, then the ramp
    assert "train_verified" in rows[1] and float(rows[1]["grad_gamma_R"]) > 0
    assert saved["searched_cells"] == ["normal"]  # 2 cells: no reduction cell
    tensors, meta = load_file(out / "checkpoint.pt", kind="checkpoint")
    assert meta["epoch"] == 1 and "arch_normal" in tensors["model"]
    for picture in ("cells.png", "arch_weights.png"):
        assert (out / picture).read_bytes()[:4] == b"\x89PNG"


def test_same_seed_gives_the_same_architecture_weights(tmp_path):
    a = search(TINY, tmp_path / "a", quiet=True)
    b = search(TINY, tmp_path / "b", quiet=True)
    c = search(replace(TINY, seed=1), tmp_path / "c", quiet=True)
    assert a["arch_weights"] == b["arch_weights"]
    assert a["arch_weights"] != c["arch_weights"]


def test_interrupted_search_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    reference = search(TINY, tmp_path / "full", quiet=True)
    # the third weight step: epoch 2, first batch, after one checkpoint
    run_interrupted(monkeypatch, search_module.Searcher, "weight_step", 3,
                    lambda: search(TINY, tmp_path / "cut", quiet=True))
    assert not (tmp_path / "cut" / "genotype.json").exists()
    resumed = search(TINY, tmp_path / "cut", resume=True, quiet=True)
    assert resumed["arch_weights"] == reference["arch_weights"]
    assert resumed["normal"] == reference["normal"] and resumed["reduce"] == reference["reduce"]


def test_cosine_architecture_rate_decays_to_its_minimum_and_resumes_exactly(tmp_path, monkeypatch):
    """--a-lr-schedule cosine: the rate falls per architecture step from a_lr to a_lr_min (half-way at the
    middle of the architecture steps), its state is checkpointed, and it changes the search (constant differs)."""
    config = replace(TINY, a_lr=0.1, a_lr_schedule="cosine", a_lr_min=0.01, epochs=3, arch_start_epoch=1)
    reference = search(config, tmp_path / "full", quiet=True)
    rows = list(csv.DictReader(open(tmp_path / "full" / "history.csv")))
    rates = [float(r["a_lr"]) for r in rows]
    assert rates[0] == pytest.approx(0.1)  # no architecture step in epoch 1
    assert rates[1] == pytest.approx(0.01 + 0.5 * (0.1 - 0.01))  # 2 of 4 architecture steps made
    assert rates[2] == pytest.approx(0.01)
    constant = search(replace(config, a_lr_schedule="constant"), tmp_path / "constant", quiet=True)
    assert constant["arch_weights"] != reference["arch_weights"]
    assert {float(r["a_lr"]) for r in csv.DictReader(open(tmp_path / "constant" / "history.csv"))} == {0.1}
    # the fifth weight step: epoch 3, first batch, after two checkpoints and one architecture step in it
    run_interrupted(monkeypatch, search_module.Searcher, "weight_step", 5,
                    lambda: search(config, tmp_path / "cut", quiet=True))
    resumed = search(config, tmp_path / "cut", resume=True, quiet=True)
    assert resumed["arch_weights"] == reference["arch_weights"]


def test_non_empty_output_is_refused_without_resume_or_force(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="not empty"):
        search(TINY, tmp_path / "run", quiet=True)
    with pytest.raises(RunFolderError, match="no checkpoint"):
        search(TINY, tmp_path / "run", resume=True, quiet=True)


def test_resume_with_different_settings_is_refused(tmp_path):
    search(replace(TINY, epochs=1, warmup_epochs=0), tmp_path / "run", quiet=True)
    with pytest.raises(ConfigError, match="settings differ"):
        search(replace(TINY, epochs=1, warmup_epochs=0, gamma=0.5), tmp_path / "run", resume=True, quiet=True)


@pytest.mark.slow
@pytest.mark.parametrize("change", [
    {"term": "none"}, {"term": "clb", "bound": "crown-ibp"}, {"term": "clb", "clb_form": "radius"},
    {"term": "clb", "clb_scale": "linear"}, {"term": "jacobian"}, {"term": "jacobian", "jacobian_projections": 2},
    {"term": "combined"}, {"term": "none", "strategy": "sdarts-adv", "sdarts_steps": 2}, {"term": "none", "strategy": "pgd", "pgd_steps": 2},
    {"term": "clb", "order": 2}, {"term": "clb", "partial_channels": 2, "edge_normalization": True},
    {"term": "clb", "norm": "2", "eps": 0.1}, {"term": "clb", "layers": 3, "stem": "cifar", "weight_mode": "crown-ibp"},
    {"term": "none", "weight_mode": "ibp"}, {"term": "clb", "strategy": "sdarts-adv", "sdarts_steps": 2},
], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_every_metric_and_option_runs_an_epoch(tmp_path, change):
    config = replace(TINY, epochs=1, train_limit=8, val_limit=8, warmup_epochs=0, **change)
    record = search(config, tmp_path / "run", quiet=True)
    Genotype.from_dict(record)
    row = next(csv.DictReader(open(tmp_path / "run" / "history.csv")))
    assert all(v != "nan" for v in row.values())


def test_architecture_weights_move_with_the_metric(tmp_path):
    """R contributes to the architecture gradient: with gamma = 0 and gamma > 0 the runs differ."""
    base = replace(TINY, epochs=1, warmup_epochs=0)
    with_r = search(replace(base, gamma=1.0), tmp_path / "a", quiet=True)
    without = search(replace(base, gamma=0.0), tmp_path / "b", quiet=True)
    assert with_r["arch_weights"] != without["arch_weights"]


@pytest.mark.parametrize("change,message", [({"term": "fgsm"}, "unknown term"), ({"strategy": "fgsm"}, "unknown strategy"), ({"order": 3}, "unknown order 3"),
                                            ({"bound": "alpha-crown"}, "unknown bound"), ({"layers": 0}, "layers must be"),
                                            ({"strategy": "pgd", "weight_mode": "ibp"}, "own weight step"),
                                            ({"weight_mode": "pgd"}, "unknown weight mode"),
                                            ({"layers": 3}, "stride-2 pooling needs even sizes"),
                                            ({"arch_start_epoch": 2}, "architecture steps would start in epoch 3 of 2"),
                                            ({"a_lr_schedule": "step"}, "unknown a lr schedule"),
                                            ({"a_lr_min": 0.3}, "a_lr_min must be in")])
def test_invalid_settings_are_refused(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        search(replace(TINY, **change), tmp_path / "run", quiet=True)


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["mnist", "cifar10", "imagenet"])
def test_search_runs_on_test_sized_files_in_the_real_formats(tmp_path, dataset):
    from tests.certnas.datafiles import write_cifar10, write_imagefolder, write_mnist
    root = {"mnist": write_mnist, "cifar10": write_cifar10,
            "imagenet": lambda r: write_imagefolder(r, classes=3, per_class=8)}[dataset](tmp_path / "data")
    config = replace(TINY, data=dataset, data_root=str(root), image_size=16, epochs=1, train_limit=8, val_limit=8,
                     warmup_epochs=0)
    record = search(config, tmp_path / "run", quiet=True)
    Genotype.from_dict(record)
    assert record["settings"]["data"] == dataset


def test_metric_is_a_term_and_a_strategy_in_one_word_and_old_settings_upgrade():
    from certnas.config import upgrade_saved
    from certnas.search import SEARCH_METRICS, split_metric
    assert [split_metric(m) for m in SEARCH_METRICS] == [
        ("none", "darts"), ("clb", "darts"), ("jacobian", "darts"), ("combined", "darts"),
        ("none", "sdarts-adv"), ("none", "pgd")]
    for metric in SEARCH_METRICS:
        term, strategy = split_metric(metric)
        assert SearchConfig(term=term, strategy=strategy).metric == metric
    assert SearchConfig(term="clb", strategy="pgd").metric is None
    with pytest.raises(ConfigError, match="unknown metric 'fgsm'"):
        split_metric("fgsm")
    old = {k: v for k, v in asdict(TINY).items() if k not in ("term", "strategy")}
    old["metric"] = "sdarts-adv"
    assert upgrade_saved(SearchConfig, old) == asdict(replace(TINY, term="none", strategy="sdarts-adv"))
    assert replace(TINY, strategy="sdarts-adv").resolved_weight_mode() == "standard"  # auto: the baseline's step


def test_a_run_saved_with_the_one_word_metric_resumes(tmp_path):
    run = tmp_path / "run"
    search(replace(TINY, epochs=1, warmup_epochs=0), run, quiet=True)
    saved = json.loads((run / "config.json").read_text())
    saved["metric"] = saved.pop("term")
    del saved["strategy"]
    (run / "config.json").write_text(json.dumps(saved))  # as an earlier version wrote it
    search(replace(TINY, epochs=1, warmup_epochs=0), run, resume=True, quiet=True)  # refused if it differed
    with pytest.raises(ConfigError, match=r"settings differ .*\(strategy, weight_mode\)"):
        search(replace(TINY, epochs=1, warmup_epochs=0, strategy="pgd", weight_mode="standard"), run, resume=True,
               quiet=True)
