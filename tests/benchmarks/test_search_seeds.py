"""benchmarks/search_seeds.py: the settling criteria read from a run folder, and a tiny run end to end."""
import csv
import json
import math

import pytest

from benchmarks import search_seeds

EDGES = [["sep_conv_3x3", 0], ["skip_connect", 1], ["max_pool_3x3", 0], ["dil_conv_3x3", 2],
         ["sep_conv_5x5", 1], ["avg_pool_3x3", 3], ["none", 0], ["dil_conv_5x5", 4]]


def _write_run(folder, normal_before, normal_after, entropy, margin):
    folder.mkdir()
    rows = [{"epoch": 1, "seconds": 10.0, "arch_entropy": 2.0, "clb_margin": -5.0, "clb_certified": 0.0, "a_lr": 0.1,
             "genotype": json.dumps({"normal": normal_before, "reduce": []})},
            {"epoch": 2, "seconds": 12.5, "arch_entropy": entropy, "clb_margin": margin, "clb_certified": 0.25, "a_lr": 0.0,
             "genotype": json.dumps({"normal": normal_after, "reduce": []})}]
    with open(folder / "history.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (folder / "genotype.json").write_text(json.dumps({
        "normal": normal_after, "reduce": [], "searched_cells": ["normal"],
        "arch_weights": {"normal": [[0.125] * 8 for _ in range(14)]}}))


def test_criteria_are_read_from_the_history(tmp_path):
    changed = [list(e) for e in EDGES]
    changed[0][0], changed[3][1] = "max_pool_3x3", 1  # an operation and an input changed: 6 of 8 agree
    _write_run(tmp_path / "a", EDGES, changed, 0.74 * math.log(8), -3.0)
    a = search_seeds.read_run(tmp_path / "a")
    assert a["edges_agreeing_last_two"] == {"normal": 6} and a["agreement_criterion_met"]
    assert a["entropy_criterion_met"] and a["final_entropy_share"] == pytest.approx(0.74, abs=1e-4)
    assert a["margin_criterion_met"] and a["last_clb_certified"] == 0.25 and a["search_seconds"] == 22.5
    changed[1][0] = "none"  # 5 of 8
    _write_run(tmp_path / "b", EDGES, changed, 0.76 * math.log(8), -150.0)
    b = search_seeds.read_run(tmp_path / "b")
    assert b["edges_agreeing_last_two"] == {"normal": 5}
    assert not (b["agreement_criterion_met"] or b["entropy_criterion_met"] or b["margin_criterion_met"])


def test_tiny_run_writes_records_and_a_table_and_keeps_other_labels(tmp_path):
    out = tmp_path / "seeds.json"
    tiny = ["--set", "layers=2", "--set", "init_channels=4", "--set", "steps=2", "--set", "multiplier=2",
            "--set", "batch_size=8", "--set", "train_limit=16", "--set", "val_limit=16", "--set", "epochs=2",
            "--set", "metric_samples=4", "--work", str(tmp_path / "runs"), "--out", str(out), "--quiet"]
    search_seeds.main(["--seeds", "0,1", "--label", "tiny"] + tiny)
    search_seeds.main(["--seeds", "0", "--label", "tiny constant", "--set", "a_lr_schedule=constant"] + tiny)
    records = json.loads(out.read_text())["records"]
    assert [(r["label"], r["seed"]) for r in records] == [("tiny", 0), ("tiny", 1), ("tiny constant", 0)]
    assert records[0]["a_lr_per_epoch"][-1] == 0.0 and records[2]["a_lr_per_epoch"] == [0.2, 0.2]  # cosine: default
    assert all(r["edges"] == {"normal": 4} for r in records)  # a 2-node cell keeps 4 edges
    assert records[0]["entropy_per_epoch"] != records[1]["entropy_per_epoch"]
    assert out.with_suffix(".md").read_text().count("| tiny") == 3
    with pytest.raises(SystemExit) as exit:  # the label's folders hold runs of other settings
        search_seeds.main(["--seeds", "0", "--label", "tiny", "--set", "gamma=0.5"] + tiny)
    assert exit.value.code == 2


def test_bad_settings_exit_with_code_2(tmp_path, capsys):
    for bad in (["--set", "a_lr_shedule=cosine"], ["--set", "epochs"], ["--seeds", "one"]):
        with pytest.raises(SystemExit) as exit:
            search_seeds.main(bad + ["--work", str(tmp_path), "--out", str(tmp_path / "x.json")])
        assert exit.value.code == 2
    assert "did you mean 'a_lr_schedule'" in capsys.readouterr().err
