"""CIFAR-100 and digits data modules: held-out split, transforms, global batch size, clear errors."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torchvision import datasets
from torchvision.datasets import cifar as cifar_module

from ftforget.data import CIFAR100DataModule
from ftforget.data.cifar import holdout_split
from ftforget.data.digits import DigitsDataModule, DigitsProbe


def write_tiny_cifar100(root, n_train: int = 60, n_test: int = 20) -> None:
    """CIFAR-100 in torchvision's python format (the real layout and pickles, tiny and random)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        data = {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "fine_labels": (np.arange(n) % 100).tolist(),
            "coarse_labels": (np.arange(n) % 20).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(data))
    meta = {
        "fine_label_names": [f"class{i}" for i in range(100)],
        "coarse_label_names": [f"s{i}" for i in range(20)],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta))


@pytest.fixture
def tiny_cifar(tmp_path, monkeypatch):
    write_tiny_cifar100(tmp_path)
    # torchvision checks the real files' md5 sums; the tiny copy cannot match them
    monkeypatch.setattr(datasets.CIFAR100, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar_module, "check_integrity", lambda path, md5=None: True)
    return tmp_path


def test_holdout_split_is_fixed_disjoint_and_complete():
    train, val = holdout_split(100, 10, seed=3)
    assert (train, val) == holdout_split(100, 10, seed=3)
    assert len(val) == 10 and not set(train) & set(val) and sorted(train + val) == list(range(100))
    assert holdout_split(100, 10, seed=4)[1] != val
    with pytest.raises(ValueError, match="data.val_size=100"):
        holdout_split(100, 100, seed=0)


def test_cifar_splits_transforms_and_batches(tiny_cifar):
    dm = CIFAR100DataModule(root=str(tiny_cifar), batch_size=4, num_workers=0, val_size=12, image_size=32)
    dm.setup("fit")
    assert [len(dm.dataset(s)) for s in ("train", "val", "test")] == [48, 12, 20]
    raw = datasets.CIFAR100(str(tiny_cifar), train=True)
    val_indices = dm.dataset("val").indices
    # validation images come from the training file, never from test, with the eval transform (resize only)
    image, label = dm.dataset("val")[0]
    assert label == raw.targets[val_indices[0]] and image.shape == (3, 32, 32)
    expected = (
        torch.as_tensor(raw.data[val_indices[0]]).permute(2, 0, 1).float() / 255
        - torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    ) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    assert torch.allclose(image, expected, atol=1e-6)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and y.shape == (4,)


def test_half_normalisation_option(tiny_cifar):
    dm = CIFAR100DataModule(
        root=str(tiny_cifar), num_workers=0, val_size=12, image_size=32, normalization="half"
    )
    image, _ = dm.dataset("test")[0]
    raw = datasets.CIFAR100(str(tiny_cifar), train=False).data[0]
    assert torch.allclose(image, torch.as_tensor(raw).permute(2, 0, 1).float() / 255 * 2 - 1, atol=1e-6)


def test_global_batch_is_divided_by_world_size(tiny_cifar):
    dm = CIFAR100DataModule(root=str(tiny_cifar), batch_size=8, num_workers=0, val_size=12, image_size=32)
    dm.trainer = SimpleNamespace(world_size=2)
    assert dm.per_device_batch_size() == 4
    dm.trainer = SimpleNamespace(world_size=3)
    with pytest.raises(ValueError, match="data.batch_size=8 is global and must divide by the world size 3"):
        dm.per_device_batch_size()


def test_missing_cifar_says_where_it_looked_and_how_to_get_it(tmp_path):
    dm = CIFAR100DataModule(root=str(tmp_path / "nowhere"), num_workers=0)
    with pytest.raises(FileNotFoundError, match=r"nowhere.*cifar-100-python.*--data.download true"):
        dm.setup("fit")


def test_digits_domains_are_disjoint_and_fixed():
    dm = DigitsDataModule(batch_size=16)
    dm.setup("fit")
    assert dm.num_classes == 5
    sizes = [len(dm.dataset(s)) for s in ("train", "val", "test")]
    assert sum(sizes) == 896  # digits 5-9 in scikit-learn's set: 182 + 181 + 179 + 174 + 180
    probe = dm.probe
    assert isinstance(probe, DigitsProbe) and probe.num_classes == 5
    bank, queries = probe.bank_dataset(), probe.query_dataset()
    assert len(bank) + len(queries) == 901  # digits 0-4
    image, label, index = queries[3]
    assert index == 3 and image.shape == (3, 32, 32) and 0 <= label < 5
    with pytest.raises(ValueError, match="must not overlap"):
        DigitsDataModule(new_digits=[1, 2], old_digits=[2, 3])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"normalization": "imagenet21k"}, "data.normalization='imagenet21k'"),
        ({"batch_size": 0}, "data.batch_size must be >= 1"),
        ({"num_workers": -1}, "data.num_workers must be >= 0"),
    ],
)
def test_bad_data_options_are_named(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        CIFAR100DataModule(root=str(tmp_path), **kwargs)


@pytest.mark.parametrize(("n", "world"), [(179, 2), (180, 2), (7, 3), (3, 3)])
def test_evaluation_shards_cover_each_sample_once(n: int, world: int) -> None:
    """Under DDP each sample of a validation or test split is scored once: no padding (Lightning's
    DistributedSampler repeats samples up to a multiple of the world size)."""
    from ftforget.data.resumable import EvalShard

    shards = [list(EvalShard(n, rank, world)) for rank in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError, match=f"split of {world - 1} samples cannot be shared by {world}"):
        EvalShard(world - 1, 0, world)


def test_evaluation_loaders_under_ddp_use_unpadded_shards() -> None:
    from ftforget.data.resumable import EvalShard

    data = DigitsDataModule(batch_size=64)
    data.setup()
    seen = []
    for rank in (0, 1):
        data.trainer = SimpleNamespace(world_size=2, global_rank=rank)  # what Lightning sets under DDP
        loader = data.test_dataloader()
        assert isinstance(loader.sampler, EvalShard) and loader.batch_size == 32
        seen += [int(i) for i in loader.sampler]
    assert sorted(seen) == list(range(len(data.dataset("test")))) == list(range(179))
