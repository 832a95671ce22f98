"""The model file: round trip in eval mode; malicious, corrupt and unknown-version files refused."""
import os
import pickle
import zipfile

import pytest
import torch

from certnas.io import VERSION, ModelFileError, load_model, load_model_with_meta, save_file, save_model
from certnas.space.genotype import NAMED
from certnas.space.network import NetworkConfig, build_network


def _saved(tmp_path, kind="darts"):
    if kind == "darts":
        config = NetworkConfig("darts", 1, 16, 10, (0.13,), (0.31,), genotype=NAMED["DARTS_V2"].to_dict(), layers=3,
                               init_channels=4, auxiliary=True)
    else:
        config = NetworkConfig("mlp", 1, 8, 3, (0.5,), (0.25,), hidden=(6,))
    torch.manual_seed(0)
    model = build_network(config)
    model.train()
    model(torch.rand(8, config.in_channels, config.image_size, config.image_size))  # move the BN statistics
    path = tmp_path / "model.pt"
    save_model(model, path, network=config.to_dict(), dataset={"name": "mnist-embedded"}, training={"mode": "ibp"})
    return model.eval(), path, config


@pytest.mark.parametrize("kind", ["darts", "mlp"])
def test_saved_model_loads_in_eval_mode_with_the_same_outputs_and_metadata(tmp_path, kind):
    model, path, config = _saved(tmp_path, kind)
    loaded, meta = load_model_with_meta(path)
    assert not loaded.training
    x = torch.rand(3, config.in_channels, config.image_size, config.image_size)
    torch.testing.assert_close(loaded(x), model(x))
    assert meta["training"] == {"mode": "ibp"} and meta["dataset"]["name"] == "mnist-embedded"
    assert NetworkConfig.from_dict(meta["network"]) == config
    assert torch.load(path, weights_only=True)["kind"] == "model"  # the safe loader reads it


class _CreatesAFile:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_a_pickle_that_would_create_a_file_is_refused_and_creates_nothing(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "certnas", "version": VERSION, "kind": "model", "tensors": _CreatesAFile(str(target)),
                "meta": "{}"}, path)
    # the payload really runs under a full unpickler: the test's own sanity check
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        pickle.loads(archive.read(name))
    assert target.exists()
    os.remove(target)
    with pytest.raises(ModelFileError, match="refused"):
        load_model(path)
    assert not target.exists()


def test_truncated_file_is_a_clear_error(tmp_path):
    _, path, _ = _saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated or corrupt"):
        load_model(path)


def test_unknown_version_not_certnas_and_wrong_kind_are_clear_errors(tmp_path):
    path = tmp_path / "future.pt"
    save_file(path, "model", {}, {})
    payload = torch.load(path, weights_only=True)
    payload["version"] = VERSION + 1
    torch.save(payload, path)
    with pytest.raises(ModelFileError, match="unknown certnas file version"):
        load_model(path)
    torch.save({"state_dict": {}}, tmp_path / "plain.pt")
    with pytest.raises(ModelFileError, match="not a certnas file"):
        load_model(tmp_path / "plain.pt")
    save_file(tmp_path / "ckpt.pt", "checkpoint", {}, {})
    with pytest.raises(ModelFileError, match="expected a 'model'"):
        load_model(tmp_path / "ckpt.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ModelFileError):
        load_model(tmp_path / "text.pt")


def test_weights_that_do_not_match_the_description_are_a_clear_error(tmp_path):
    model, path, config = _saved(tmp_path, "mlp")
    other = NetworkConfig("mlp", 1, 8, 3, (0.5,), (0.25,), hidden=(7,))
    save_model(model, path, network=other.to_dict())
    with pytest.raises(ModelFileError, match="does not match"):
        load_model(path)
