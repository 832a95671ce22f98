"""benchmarks.same_recipe: every network trained by the same recipe, verified, summarised; a rerun resumes."""
import csv

import pytest

from benchmarks import same_recipe
from tests.certnas.datafiles import write_mnist


@pytest.mark.slow
def test_same_recipe_trains_verifies_and_summarises_each_network_and_a_rerun_keeps_finished_stages(tmp_path):
    root = write_mnist(tmp_path / "data", train=40, test=20)
    out = tmp_path / "out"
    argv = ["--data-root", str(root), "--networks", "cnn,dsrna-cb", "--seeds", "0", "--n", "8",
            "--train-args", "--epochs 1 --batch-size 20 --init-channels 4", "--out", str(out)]
    rows = same_recipe.main(argv)
    assert [(r["network"], r["seed"]) for r in rows] == [("cnn", 0), ("dsrna-cb", 0), ("cnn", "mean of 1"),
                                                         ("dsrna-cb", "mean of 1")]
    for row in rows[:2]:
        assert 0 <= row["verified"] <= row["pgd"] <= row["clean"]            # certified digits are attack-proof
        assert max(row["ibp"], row["crown_ibp"]) <= row["verified"]
    import json
    settings = json.loads((out / "cnn-seed0" / "train" / "config.json").read_text())
    assert settings["mode"] == "ibp" and settings["train_limit"] == 10000 and settings["epochs"] == 1
    assert settings["eps"] == settings["eps_train"] == 0.1                          # trained at the eps verified
    searched = json.loads((out / "dsrna-cb-seed0" / "train" / "summary.json").read_text())["network"]["genotype"]
    assert searched["normal"] == json.loads(same_recipe.GENOTYPE.read_text())["normal"]
    model = out / "cnn-seed0" / "train" / "model.pt"
    stamp = model.stat().st_mtime_ns
    (out / "dsrna-cb-seed0" / "verify-0.1" / "verify.json").unlink()        # an interrupted verify
    again = same_recipe.main(argv)
    assert model.stat().st_mtime_ns == stamp and again[0] == rows[0]          # nothing retrained
    assert (out / "dsrna-cb-seed0" / "verify-0.1" / "verify.json").exists() and again[1]["network"] == "dsrna-cb"
    with open(out / "same_recipe.csv") as stream:
        assert len(list(csv.DictReader(stream))) == 4
    assert "| cnn | 0 |" in (out / "same_recipe.md").read_text()
    runs = json.loads((out / "runs.json").read_text())                    # both runs recorded, none overwritten
    assert len(runs) == 2 and all("--seeds 0" in r["command"] and "torch" in r["environment"] for r in runs)


def test_record_run_appends_and_keeps_earlier_records(tmp_path):
    import json
    for number in range(3):
        same_recipe.record_run(tmp_path, {"run": number})
    assert json.loads((tmp_path / "runs.json").read_text()) == [{"run": 0}, {"run": 1}, {"run": 2}]


def test_same_recipe_refuses_unknown_networks_and_seeds(capsys):
    for argv, message in ((["--networks", "vgg"], "unknown network 'vgg'"), (["--seeds", "a"], "expected integers")):
        with pytest.raises(SystemExit) as stop:
            same_recipe.main(argv + ["--summarise"])
        assert stop.value.code == 2 and message in capsys.readouterr().err


def test_same_recipe_refuses_a_folder_trained_at_another_eps_and_says_when_certnas_refused_its_input(tmp_path, capfd):
    import json
    train = tmp_path / "cnn-seed0" / "train"
    train.mkdir(parents=True)
    (train / "config.json").write_text(json.dumps({"eps": 0.1}))
    with pytest.raises(SystemExit) as stop:
        same_recipe.main(["--networks", "cnn", "--eps", "0.3", "--out", str(tmp_path)])
    assert stop.value.code == 2 and "was trained at eps 0.1, not 0.3: use another --out" in capfd.readouterr().err
    with pytest.raises(SystemExit) as stop:
        same_recipe.main(["--networks", "cnn", "--data-root", str(tmp_path / "none"), "--out", str(tmp_path / "b")])
    err = capfd.readouterr().err
    assert stop.value.code == 2 and "it refused its input" in err and "resume" not in err
