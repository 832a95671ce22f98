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
    assert "git_commit" in json.loads((out / "run.json").read_text())["versions"]
    stages = sorted(p.name for p in (out / "cache").iterdir())
    paper.main(["--scale", "tiny", "--seeds", "1", "--rows", "DARTS", "--out", str(out)])  # all cached
    assert sorted(p.name for p in (out / "cache").iterdir()) == stages
    moved = tmp_path / "elsewhere"  # a cloned or moved results folder keeps its cache
    out.rename(moved)
    paper.main(["--scale", "tiny", "--seeds", "1", "--rows", "DARTS", "--out", str(moved)])
    assert sorted(p.name for p in (moved / "cache").iterdir()) == stages
