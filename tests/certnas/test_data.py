"""Datasets load from the real on-disk formats; missing or bad files give one clear error."""
import pickle

import pytest
import torch

from certnas.data import DataError, load_data
from tests.certnas.datafiles import write_cifar10, write_imagefolder, write_mnist


def test_embedded_mnist_split_is_stratified_deterministic_and_in_unit_range():
    a, b = load_data("mnist-embedded", seed=0), load_data("mnist-embedded", seed=0)
    assert (len(a.train), len(a.val), len(a.test)) == (3000, 1000, 1000)
    x, y = a.train.tensors
    assert x.shape[1:] == (1, 28, 28) and 0 <= x.min() and x.max() <= 1
    assert torch.bincount(y).tolist() == [300] * 10
    assert torch.equal(y, b.train.tensors[1])
    assert not torch.equal(y, load_data("mnist-embedded", seed=1).train.tensors[1])
    train_images = {v.numpy().tobytes() for v in x}
    assert not train_images & {v.numpy().tobytes() for v in a.test.tensors[0]}


def test_mnist_reads_idx_files(tmp_path):
    splits = load_data("mnist", write_mnist(tmp_path), val_fraction=0.25)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (30, 10, 20)
    x, y = splits.test[3]
    assert x.shape == (1, 28, 28) and 0 <= x.min() and x.max() <= 1 and int(y) == 3


def test_cifar10_reads_python_batches(tmp_path):
    splits = load_data("cifar10", write_cifar10(tmp_path), val_fraction=0.2)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (40, 10, 10)
    x, y = splits.test[7]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and int(y) == 7


def test_cifar10_refuses_a_batch_that_would_run_code(tmp_path):
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as stream:
        pickle.dump({b"data": Exploit(), b"labels": []}, stream)
    with pytest.raises(DataError, match="cannot read the batches"):
        load_data("cifar10", tmp_path)
    assert not marker.exists()


def test_imagefolder_is_resized(tmp_path):
    splits = load_data("imagenet", write_imagefolder(tmp_path), image_size=16, val_fraction=0.25)
    assert splits.info.num_classes == 3 and len(splits.test) == 12
    assert splits.train[0][0].shape == (3, 16, 16)
    shared = load_data("imagenet", write_imagefolder(tmp_path / "root" / "imagenet").parent, image_size=16)
    assert len(shared.test) == 12  # <data-root>/imagenet/{train,val} as well


@pytest.mark.parametrize("name,message", [("mnist", "expected MNIST/raw"), ("cifar10", "missing data_batch_1"),
                                          ("imagenet", "expected an ImageFolder tree")])
def test_missing_files_name_what_was_expected_where(tmp_path, name, message):
    with pytest.raises(DataError, match=message):
        load_data(name, tmp_path)


def test_missing_root_and_unknown_dataset():
    with pytest.raises(DataError, match="needs --data-root"):
        load_data("cifar10")
    with pytest.raises(DataError, match="unknown dataset 'svhn'"):
        load_data("svhn")
