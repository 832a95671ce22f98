"""The paper pipeline end to end at a tiny size: tables, figures, records, and the cache."""
import json

import pytest

from benchmarks import paper


@pytest.mark.slow
def test_paper_pipeline_runs_end_to_end_and_reuses_its_cache(tmp_path):
    out = tmp_path / "tiny"
    paper.main(["--scale", "tiny", "--seeds", "1", "--rows", "DARTS,DSRNA-CB", "--out", str(out)])
    for name in ("game_mnist", "clean_mnist", "certified_mnist", "search_cost_mnist"):
        assert (out / f"{name}.csv").is_file() and "| DSRNA-CB |" in (out / f"{name}.md").read_text()
    assert "Skipped" in (out / "game_cifar10.md").read_text() and "Skipped" in (out / "imagenet.md").read_text()
    assert (out / "radius_mnist_inf.png").read_bytes()[:4] == b"\x89PNG"
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert {r["row"] for r in records} == {"DARTS", "DSRNA-CB"}
    import pandas as pd
    certified = pd.read_csv(out / "certified_mnist.csv")
    for record in records:  # full CROWN's radii on the scale's first crown_n samples, every row and norm
        for norm in ("inf", "2"):
            crown = pd.read_csv(out / record[f"crown_csv_{norm}"])
            crown = crown[(crown["mode"] == "radius") & (crown["method"] == "crown")]
            assert len(crown) == paper.SCALES["tiny"].crown_n and (crown["radius"] >= 0).all()
            assert record[f"radius_{norm}"]["crown"]["median"] == pytest.approx(crown["radius"].median())
            main = pd.read_csv(out / record[f"radius_csv_{norm}"])
            assert set(crown["index"]) <= set(main["index"])  # a subset of the IBP / CROWN-IBP samples
    assert not certified[["L-inf crown mean / median", "L2 crown mean / median"]].isin(["n/a"]).any().any()
    assert "git_commit" in json.loads((out / "run.json").read_text())["versions"]
    stages = sorted(p.name for p in (out / "cache").iterdir())
    paper.main(["--scale", "tiny", "--seeds", "1", "--rows", "DARTS", "--out", str(out)])  # all cached
    assert sorted(p.name for p in (out / "cache").iterdir()) == stages
    # CROWN stages of another device, only where cached: none here, so n/a and nothing runs (no GPU needed)
    paper.main(["--scale", "tiny", "--seeds", "1", "--rows", "DARTS", "--table", "certified", "--out", str(out),
                "--crown-device", "cuda", "--crown-cached-only"])
    assert sorted(p.name for p in (out / "cache").iterdir()) == stages
    assert pd.read_csv(out / "certified_mnist.csv", keep_default_na=False)["L-inf crown mean / median"].tolist() == ["n/a"]
    assert "only where its stage finished" in (out / "certified_mnist.md").read_text()
    moved = tmp_path / "elsewhere"  # a cloned or moved results folder keeps its cache
    out.rename(moved)
    paper.main(["--scale", "tiny", "--seeds", "1", "--rows", "DARTS", "--out", str(moved)])
    assert sorted(p.name for p in (moved / "cache").iterdir()) == stages
    # a fresh clone has no model files (they are not committed): the tables come from the cache, nothing retrained
    table = (moved / "certified_mnist.md").read_text()
    for model in moved.glob("cache/*/model.pt"):  # git-ignored (a checkpoint may survive locally: see below)
        model.unlink()
    paper.main(["--scale", "tiny", "--seeds", "1", "--rows", "DARTS", "--out", str(moved)])
    assert sorted(p.name for p in (moved / "cache").iterdir()) == stages and not list(moved.glob("cache/*/model.pt"))
    assert (moved / "certified_mnist.md").read_text() == table
    # a stage that is not cached (CROWN on more samples) trains the network again, and every value of the
    # record is then measured on that network; a checkpoint left by the finished run, saved with the settings
    # of then, is not resumed
    for saved in moved.glob("cache/train-*/config.json"):
        settings = json.loads(saved.read_text())
        saved.write_text(json.dumps({**settings, "epochs": settings["epochs"] + 1}))
    paper.main(["--scale", "tiny", "--seeds", "1", "--rows", "DARTS", "--out", str(moved), "--crown-n", "3"])
    [model] = list(moved.glob("cache/train-*/model.pt"))
    digest = json.loads((model.parent / "stage.json").read_text())["model_sha256"]
    [record] = [json.loads(line) for line in (moved / "records.jsonl").read_text().splitlines()]
    assert record["crown_n"] == 3
    for key in ("radius_csv_inf", "crown_csv_inf", "radius_csv_2", "crown_csv_2"):
        stamp = json.loads(((moved / record[key]).parent / "stage.json").read_text())
        assert stamp["inputs"]["model"] == digest, key


@pytest.mark.slow
def test_imagenet_transfer_trains_each_rows_cifar10_cell_on_imagenet(tmp_path):
    from tests.certnas.datafiles import write_cifar10, write_imagefolder
    root = tmp_path / "data"
    write_cifar10(root, per_batch=8)
    write_imagefolder(root / "imagenet", classes=6, per_class=6, size=20)
    out = tmp_path / "tiny"
    paper.main(["--scale", "tiny", "--seeds", "1", "--rows", "DARTS", "--table", "imagenet", "--data-root", str(root),
                "--out", str(out)])
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [(r["row"], r["dataset"]) for r in records] == [("DARTS", "imagenet")]
    cifar_cell = json.loads(next((out / "cache").glob("search-*/genotype.json")).read_text())
    transferred = json.loads(next((out / "cache").glob("transfer-*/summary.json")).read_text())
    assert transferred["settings"]["data"] == "imagenet" and transferred["network"]["num_classes"] == 6
    assert transferred["network"]["genotype"]["normal"] == [list(e) for e in cifar_cell["normal"]]
    assert 0 <= records[0]["attack_pgd_inf"] <= records[0]["train_test_acc"] <= records[0]["train_test_top5_acc"] <= 1
    table = (out / "imagenet.md").read_text()
    assert "| DARTS |" in table and "top-5" in table
    # no CIFAR-10: skipped, with the reason
    paper.main(["--scale", "tiny", "--seeds", "1", "--rows", "DARTS", "--table", "imagenet", "--data-root",
                str(root / "imagenet"), "--out", str(tmp_path / "no-cifar")])
    assert "searched on CIFAR-10" in (tmp_path / "no-cifar" / "imagenet.md").read_text()


# Settings added to the search since the committed cpu tables were made that do nothing with standard
# weight steps (the certified weight step's schedule, and its optimiser, which ``auto`` resolves to
# the SGD at 0.025 those searches ran with: checked below through ``weight_training``).
_INERT_WITH_STANDARD_WEIGHTS = {"warmup_epochs", "ramp_epochs", "kappa_end", "weight_eps", "metric_follows_ramp",
                                "w_optimizer", "w_lr"}
# Added since, at the behaviour every earlier search had.
_EARLIER_BEHAVIOUR = {"stem": "cifar", "weight_mode": "standard", "arch_start_epoch": 0}


def _paper_row(saved: dict) -> str:
    from certnas.search import SearchConfig
    upgraded, defaults = SearchConfig.upgrade(saved), SearchConfig()
    identity = ("term", "strategy", "partial_channels", "edge_normalization")
    for row, settings in paper.ROWS.items():
        if all(upgraded[k] == settings.get(k, getattr(defaults, k)) for k in identity):
            return row
    raise AssertionError(f"no paper row searches with {saved}")


def test_the_paper_protocol_still_runs_the_searches_of_the_committed_tables():
    """Today's cpu-scale search settings, row by row, are those the committed tables' searches ran with
    (a changed certnas search default must not change the paper's protocol: the CLB's bound once did)."""
    from dataclasses import asdict
    from pathlib import Path
    from benchmarks.paper.pipeline import Pipeline
    from certnas.search import SearchConfig
    out = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "cpu"
    older = [json.loads(p.read_text()) for p in sorted((out / "cache").glob("search-*/config.json"))]
    older = [saved for saved in older if "weight_mode" not in saved]  # saved before the certified weight step
    assert len(older) >= 21  # 7 rows x 3 seeds
    pipeline = Pipeline(paper.SCALES["cpu"], out, None, "cpu")
    for saved in older:
        assert saved["data"] == "mnist-embedded"
        row = _paper_row(saved)
        config = pipeline.search_config(row, "mnist", saved["seed"])  # what the pipeline runs, never run here
        today = SearchConfig.upgrade(asdict(config))
        before = SearchConfig.upgrade(saved)
        differ = {k for k in set(today) | set(before) if today.get(k) != before.get(k)} - {"device", "data_root"}
        assert today["clb_form"] == "margin"  # radius_min is a setting of the radius form only
        # settings added since, at the value every earlier search had (a_lr_min: unused at a constant rate)
        assert today["a_lr_schedule"] == "constant", row
        added = {"radius_min", "a_lr_schedule", "a_lr_min"}
        assert differ <= _INERT_WITH_STANDARD_WEIGHTS | set(_EARLIER_BEHAVIOUR) | added, (row, differ)
        assert {k: today[k] for k in _EARLIER_BEHAVIOUR} == _EARLIER_BEHAVIOUR, row
        weights = config.weight_training()
        assert (weights.mode, weights.optimizer, weights.lr) == ("standard", "sgd", before["w_lr"]), row


def test_todays_pipeline_finds_the_committed_tables_searches(monkeypatch):
    """The searches of the committed cpu tables are found under the key they were saved with
    (``former_search_key``), not searched again after each new search setting."""
    from pathlib import Path
    from benchmarks.paper import pipeline as pipeline_module

    def never(*args, **kwargs):
        raise AssertionError("a committed search would run again")

    monkeypatch.setattr(pipeline_module, "search", never)
    out = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "cpu"
    pipeline = pipeline_module.Pipeline(paper.SCALES["cpu"], out, None, "cpu")
    found = {pipeline.search(row, "mnist", seed).name for row in paper.ROWS for seed in range(3)}
    assert len(found) == 21 and all((out / "cache" / name / "genotype.json").is_file() for name in found)
    # a search whose added settings leave the earlier behaviour has no former key
    config = pipeline.search_config("DSRNA-CB", "mnist", 0)
    assert pipeline_module.former_search_key(config) is not None
    from dataclasses import replace
    assert pipeline_module.former_search_key(replace(config, weight_mode="ibp")) is None


@pytest.mark.parametrize("args,message", [(["--crown-device", "foo"], "--crown-device 'foo'"),
                                          (["--device", "nonsense"], "--device 'nonsense'"),
                                          (["--crown-seeds", "0"], "--crown-seeds must be >= 1")])
def test_a_bad_device_or_crown_option_is_one_line_with_exit_code_2(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        paper.main(["--scale", "tiny", "--out", str(tmp_path)] + args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "cache").exists()  # refused before any stage ran


def test_the_committed_cpu_tables_are_read_from_the_cache_without_running_anything(monkeypatch):
    """Every record of the committed cpu tables (all rows, the 3 seeds, CROWN for the seeds run.json names) comes
    from ``benchmarks/results/cpu/cache`` with nothing searched, trained, attacked or verified, model files or not: a
    changed stage key (a setting added without its former value) would make a fresh clone recompute hours."""
    from pathlib import Path
    from benchmarks.paper import pipeline as pipeline_module

    def never(*args, **kwargs):
        raise AssertionError("a committed stage would run again")

    for name in ("search", "train", "run_attacks", "run_verify"):
        monkeypatch.setattr(pipeline_module, name, never)
    out = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "cpu"
    committed = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    crown_seeds = json.loads((out / "run.json").read_text())["crown_seeds"]
    pipeline = pipeline_module.Pipeline(paper.SCALES["cpu"], out, None, "cpu", crown_seeds=crown_seeds)
    for saved in committed:
        record = pipeline.record(saved["row"], saved["dataset"], saved["seed"])
        assert record["radius_csv_inf"] == saved["radius_csv_inf"] and record.get("crown_csv_2") == saved.get("crown_csv_2")
        assert record["train_test_acc"] == saved["train_test_acc"]
    assert len(committed) == 21
