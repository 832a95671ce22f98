"""The claim experiment runs end to end at the tiny scale, reuses its cache, and answers the claim."""
import json

import pytest

from benchmarks import claim


@pytest.mark.slow
def test_claim_experiment_runs_every_stage_reuses_its_cache_and_writes_the_verdict(tmp_path, capsys):
    out = tmp_path / "claim"
    argv = ["--scale", "tiny", "--rows", "DSRNA-CB,random-1", "--seeds", "0,1", "--out", str(out)]
    assert claim.main(argv) == 0
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert sorted((r["row"], r["seed"]) for r in records) == [("DSRNA-CB", 0), ("DSRNA-CB", 1), ("random-1", 0),
                                                               ("random-1", 1)]
    for record in records:
        for key in ("clean", "verified@0.05", "verified@0.1", "ibp@0.1", "crown-ibp@0.1", "pgd@0.1", "autoattack@0.1"):
            assert 0 <= record[key] <= 1, key
        # the best sound method certifies at least what each method does, and never more than is correct
        assert record["verified@0.1"] >= max(record["ibp@0.1"], record["crown-ibp@0.1"])
        assert record["verified@0.1"] <= record["verified@0.05"] + 1e-9
        assert record["radius_median"] >= 0
    random_cells = [r["normal"] for r in records if r["row"] == "random-1"]
    assert random_cells[0] == random_cells[1]  # one drawn cell, trained with two seeds
    assert "DSRNA-CB | 2 |" in (out / "claim.md").read_text()
    verdict = (out / "verdict.md").read_text()
    assert "DSRNA-CB vs random (all cells)" in verdict
    stages = sorted(p.name for p in (out / "cache").iterdir())
    assert claim.main(argv) == 0  # everything cached: no new stage, the same records
    assert sorted(p.name for p in (out / "cache").iterdir()) == stages
    assert [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()] == records


def test_random_cells_are_valid_distinct_and_never_use_none():
    from certnas.space.genotype import random_genotype
    cells = [random_genotype(seed) for seed in range(20)]
    assert len({c.normal for c in cells}) == 20
    for cell in cells:
        assert all(op != "none" for op, _ in cell.normal + cell.reduce)
        for node in range(4):
            first, second = cell.normal[2 * node][1], cell.normal[2 * node + 1][1]
            assert first != second and max(first, second) < node + 2
    assert random_genotype(3) == random_genotype(3)


@pytest.mark.parametrize("n", [1, 6, 8, 13])
def test_sign_flip_p_is_the_sign_test_when_every_difference_has_the_same_size(n):
    """With equal magnitudes the sign-flip test is the two-sided binomial sign test, whose p-value has a
    closed form: P(#negative <= k or >= n - k) for k observed negative signs."""
    from math import comb
    for negatives in range(n // 2 + 1):
        differences = [-0.5] * negatives + [0.5] * (n - negatives)
        tail = sum(comb(n, j) for j in range(negatives + 1)) / 2 ** n
        expected = min(1.0, 2 * tail)
        assert claim.sign_flip_p(differences) == pytest.approx(expected, abs=1e-12)
        assert claim.sign_flip_p(differences + [0.0, 0.0]) == pytest.approx(expected, abs=1e-12)  # ties drop out
        # past the exact limit it is a Monte Carlo estimate of the same number
        assert claim.sign_flip_p(differences, exact_up_to=0) == pytest.approx(expected, abs=0.005)


def test_sign_flip_p_separates_a_consistent_gap_from_noise():
    assert claim.sign_flip_p([0.02, 0.05, 0.01, 0.03, 0.04, 0.02, 0.06, 0.01]) < 0.01
    assert claim.sign_flip_p([0.31, -0.01, 0.02, -0.03, 0.01, -0.02]) > 0.3  # one large gap is not a pattern
    assert claim.sign_flip_p([]) == 1.0


def test_the_verdict_pairs_rows_by_seed_and_averages_the_random_cells_of_a_seed():
    def rec(row, seed, value):
        return {"row": row, "seed": seed, "verified@0.1": value}
    records = ([rec("DSRNA-CB", s, 0.8 + 0.01 * s) for s in range(7)]
               + [rec("DARTS (IBP weights)", s, 0.7 + 0.01 * s) for s in range(6)]  # seed 6 unpaired
               + [rec(f"random-{i}", s, 0.5 + 0.1 * i) for i in (1, 2) for s in range(7)])
    paired = claim.paired_gaps(records, "DSRNA-CB", "DARTS (IBP weights)", "verified@0.1")
    assert paired["seeds"] == list(range(6))
    assert paired["gaps"] == pytest.approx([0.1] * 6) and (paired["wins"], paired["losses"]) == (6, 0)
    assert paired["p"] == pytest.approx(2 / 64)
    random = claim.paired_gaps(records, "DSRNA-CB", "random (all cells)", "verified@0.1")
    assert random["gaps"] == pytest.approx([0.8 + 0.01 * s - 0.65 for s in range(7)])
    lines = claim.verdict(claim.summarise(records), "verified@0.1", records)
    line = next(l for l in lines if "vs DARTS (IBP weights)" in l)
    assert "paired by seed (6 seeds): mean gap +10.0, won 6, tied 0, lost 0, sign-flip p = 0.031: **significant**" in line


def test_summarise_rewrites_the_reports_from_the_records_and_runs_nothing(tmp_path, capsys):
    records = [{"row": row, "seed": s, "clean": 0.9, "verified@0.05": 0.8, "verified@0.1": v + 0.01 * s}
               for s in range(3) for row, v in (("DSRNA-CB", 0.7), ("DARTS", 0.6))]
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert claim.main(["--scale", "tiny", "--summarise", "--out", str(tmp_path)]) == 0
    assert "DSRNA-CB | 3 |" in (tmp_path / "claim.md").read_text()
    assert ("paired by seed (3 seeds): mean gap +10.0, won 3, tied 0, lost 0, sign-flip p = 0.250: **not significant**: "
            "3 untied seeds cannot go below p = 0.250") in (tmp_path / "verdict.md").read_text()
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run.json").exists()
    with pytest.raises(SystemExit) as exit_info:
        claim.main(["--scale", "tiny", "--summarise", "--out", str(tmp_path / "empty")])
    assert exit_info.value.code == 2 and "no records" in capsys.readouterr().err


@pytest.mark.parametrize("line, message", [('{"row": "DARTS", "seed": 0', "line 2: not a JSON record"),
                                           ('{"row": "DARTS"}', "line 2: a record needs a row and a seed"),
                                           ('[1, 2]', "line 2: a record needs a row and a seed")])
def test_a_broken_records_file_is_a_one_line_error_before_anything_runs(tmp_path, capsys, line, message):
    good = {"row": "DARTS", "seed": 0, "verified@0.1": 0.5}
    (tmp_path / "records.jsonl").write_text(json.dumps(good) + "\n" + line + "\n")
    for extra in (["--summarise"], ["--rows", "random-1", "--seeds", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            claim.main(["--scale", "tiny", "--out", str(tmp_path)] + extra)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("folder, scale", [("claim-cpu", "cpu"), ("claim-cpu-short", "cpu-short"),
                                           ("claim-cpu-short-pair", "cpu-short")])
def test_the_claim_protocol_still_finds_the_committed_searches(folder, scale):
    """Each committed searched row and seed is found in the cache under the key today's search settings
    of the scale give, with the cell the record holds: a changed ``certnas search`` default must not
    silently change the experiment (a rerun would search again and mix two protocols in one table;
    cpu-short takes every default, so a new default needs that scale pinned to the old value)."""
    from pathlib import Path
    from benchmarks.common import config_hash, stage_settings
    out = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / folder
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    searched = [r for r in records if r["row"] in claim.SEARCH_ROWS]
    assert len(searched) >= 8
    experiment = claim.Experiment(claim.SCALES[scale], out, None, "cpu")
    for record in searched:
        config = experiment.search_config(record["row"], record["seed"])  # never run here
        folder = out / "cache" / f"search-{config_hash('search', stage_settings(config))}"
        assert (folder / "genotype.json").is_file(), (record["row"], record["seed"])
        assert json.loads((folder / "genotype.json").read_text())["normal"] == record["normal"], record["row"]


@pytest.mark.slow
def test_parallel_jobs_run_every_unit_once_in_one_thread_each_and_share_the_cache(tmp_path):
    import torch
    out = tmp_path / "claim"
    argv = ["--scale", "tiny", "--rows", "DARTS,random-1,random-2", "--seeds", "0", "--out", str(out)]
    assert claim.main(argv + ["--jobs", "2"]) == 0
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert sorted(r["row"] for r in records) == ["DARTS", "random-1", "random-2"]
    stamps = [json.loads(p.read_text()) for p in (out / "cache").glob("*/stage.json")]
    assert len(stamps) == 1 + 3 * 5  # one search; per row a training, verified accuracy at 2 eps, radii, attacks
    assert {s["threads"] for s in stamps} == {max(1, torch.get_num_threads() // 2)}
    run = json.loads((out / "run.json").read_text())
    assert (run["jobs"], run["threads_per_job"]) == (2, max(1, torch.get_num_threads() // 2))
    stages = sorted(p.name for p in (out / "cache").iterdir())
    assert claim.main(argv) == 0  # one process finds every stage the workers made
    assert sorted(p.name for p in (out / "cache").iterdir()) == stages


def test_bad_jobs_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        claim.main(["--scale", "tiny", "--jobs", "0"])
    assert exit_info.value.code == 2
    assert "--jobs must be at least 1" in capsys.readouterr().err


def test_a_failed_row_seed_is_reported_and_the_others_are_recorded(tmp_path, monkeypatch, capsys):
    from certnas.train import TrainingDivergedError

    def record(self, row, seed):  # the stages are not what is tested here: the runner around them is
        if row == "random-2":
            raise TrainingDivergedError("training diverged in epoch 3")
        return {"row": row, "seed": seed, "clean": 0.9, "verified@0.05": 0.8, "verified@0.1": 0.7}

    monkeypatch.setattr(claim.Experiment, "record", record)
    out = tmp_path / "claim"
    code = claim.main(["--scale", "tiny", "--rows", "random-1,random-2,random-3", "--seeds", "0", "--out", str(out)])
    assert code == 1
    assert "random-2 seed 0: TrainingDivergedError: training diverged in epoch 3" in capsys.readouterr().err
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert sorted(r["row"] for r in records) == ["random-1", "random-3"]
