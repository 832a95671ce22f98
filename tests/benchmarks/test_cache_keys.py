"""Settings added or renamed since the claim experiment's committed cache was made keep its stage keys:
its cached searches and trainings are found, not recomputed (the paper tables' cpu cache: through
``former_search_key``, tests/benchmarks/test_paper.py). A stage made from another model runs again."""
import json
from dataclasses import asdict
from pathlib import Path

import pytest

from benchmarks.common import config_hash, stage_settings
from certnas.config import FORMER_VALUES, upgrade_saved
from certnas.search import SearchConfig
from certnas.train import TrainConfig

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
SEARCHES = sorted(RESULTS.glob("claim-cpu/cache/search-*/config.json"))
TRAININGS = sorted(RESULTS.glob("claim-cpu/cache/train-*/config.json"))


def _normal(settings: dict) -> dict:
    return json.loads(json.dumps(settings, default=str))


def test_there_are_committed_caches_to_check():
    assert len(SEARCHES) >= 4 and len(TRAININGS) >= 10


@pytest.mark.parametrize("path", SEARCHES, ids=lambda p: f"{p.parents[2].name}/{p.parent.name}")
def test_a_cached_search_keeps_its_key(path):
    saved = json.loads(path.read_text())
    config = SearchConfig(**upgrade_saved(SearchConfig, saved))
    # saved by older code: its settings are the key's; by today's: every setting, the key leaves some out;
    # by code before a setting was added: every setting but those (they hold their former value)
    full = _normal(asdict(config))
    added = set(FORMER_VALUES.get("SearchConfig", {})) - set(saved)
    assert saved in (_normal(stage_settings(config)), full, {k: v for k, v in full.items() if k not in added})
    assert config_hash("search", stage_settings(config)) == path.parent.name.split("-", 1)[1]


@pytest.mark.parametrize("path", TRAININGS, ids=lambda p: f"{p.parents[2].name}/{p.parent.name}")
def test_a_cached_training_keeps_its_settings(path):
    saved = json.loads(path.read_text())
    config = TrainConfig(**upgrade_saved(TrainConfig, saved))
    full = _normal(asdict(config))
    added = set(FORMER_VALUES.get("TrainConfig", {})) - set(saved)
    assert saved in (_normal(stage_settings(config)), full, {k: v for k, v in full.items() if k not in added})


def test_every_committed_claim_record_finds_its_cached_search_and_training(monkeypatch):
    """The stage folders the claim experiment asks for today are the committed ones (training's key is
    of the settings before they are resolved, so it is checked through the experiment itself)."""
    from benchmarks import claim
    asked = []

    def lookup(cache, stage, key, marker, run, inputs=None):  # where the stage would be; never runs it
        asked.append(Path(cache) / f"{stage}-{key}")
        return asked[-1]

    monkeypatch.setattr(claim, "cached_stage", lookup)
    out = RESULTS / "claim-cpu"
    experiment = claim.Experiment(claim.SCALES["cpu"], out, None, "cpu")
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) >= 10
    for record in records:
        asked.clear()
        experiment.train(record["row"], record["seed"])
        assert asked and all((folder / "config.json").is_file() for folder in asked), (record["row"], asked)


def test_a_new_value_of_an_added_setting_is_part_of_the_key():
    assert "head_grid" not in stage_settings(TrainConfig(head_grid=1))
    assert stage_settings(TrainConfig(head_grid=7))["head_grid"] == 7
    assert stage_settings(TrainConfig())["head_grid"] == 0  # today's default is not what the caches ran with
    combined = stage_settings(SearchConfig(term="clb", strategy="pgd"))  # no one-word metric names it
    assert combined["term"] == "clb" and combined["strategy"] == "pgd" and "metric" not in combined


def test_a_stage_made_from_another_model_runs_again(tmp_path):
    """Model files are not committed: a retrained model (not bit-identical) must not reuse the attack or
    verify stage of the model it replaced, while an unchanged one does."""
    from benchmarks.common import cached_stage, model_digest
    runs = []

    def train(folder, resume):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.pt").write_bytes(f"weights {len(runs)}".encode())
        runs.append("train")

    def verify(folder, resume):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "verify.json").write_text("{}")
        runs.append("verify")

    trained = cached_stage(tmp_path, "train", "t", "model.pt", train)
    first = model_digest(trained)
    assert first is not None
    for _ in range(2):
        cached_stage(tmp_path, "verify", "v", "verify.json", verify, inputs={"model": model_digest(trained)})
    assert runs == ["train", "verify"]
    (trained / "model.pt").unlink()  # a fresh clone: the model is retrained
    cached_stage(tmp_path, "train", "t", "model.pt", train)
    assert model_digest(trained) not in (None, first)
    cached_stage(tmp_path, "verify", "v", "verify.json", verify, inputs={"model": model_digest(trained)})
    assert runs == ["train", "verify", "train", "verify"]
    # a stage saved before digests were kept is reused for a model without one, and only for such a model
    legacy = tmp_path / "verify-old"
    legacy.mkdir()
    (legacy / "verify.json").write_text("{}")
    (legacy / "stage.json").write_text(json.dumps({"stage": "verify", "seconds": 1.0, "resumed": False}))
    cached_stage(tmp_path, "verify", "old", "verify.json", verify, inputs={"model": None})
    assert len(runs) == 4
    cached_stage(tmp_path, "verify", "old", "verify.json", verify, inputs={"model": model_digest(trained)})
    assert len(runs) == 5
