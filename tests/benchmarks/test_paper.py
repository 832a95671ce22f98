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
    moved = tmp_path / "elsewhere"  # a cloned or moved results folder keeps its cache
    out.rename(moved)
    paper.main(["--scale", "tiny", "--seeds", "1", "--rows", "DARTS", "--out", str(moved)])
    assert sorted(p.name for p in (moved / "cache").iterdir()) == stages


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
