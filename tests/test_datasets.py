"""New-task datasets: each builds from a tiny copy in its real on-disk format, the held-out split is disjoint
and fixed, missing data is a one-line error, and every method config composes with every data add-on."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets
from torchvision.datasets import cifar as cifar_module
from torchvision.datasets import flowers102 as flowers_module

from ftforget.cli import run_lightning
from ftforget.commands import main
from ftforget.data import (
    CIFAR10DataModule,
    DTDDataModule,
    Flowers102DataModule,
    Food101DataModule,
    ImageFolderDataModule,
)
from ftforget.data.new_task import backbone_stats
from tests.helpers import tiny_trainer_options
from tests.test_cli import CONFIGS, TINY12
from tests.test_data import write_tiny_cifar100

ROOT = Path(__file__).resolve().parents[1]
ADD_ONS = sorted((ROOT / "configs" / "data").glob("*.yaml"))
CLASSES = ["banded", "dotted", "striped"]


def write_jpg(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


# ------------------------------------------------------------------ tiny copies in the real formats
def write_cifar10(root: Path, n_train: int = 10, n_test: int = 8) -> None:
    """cifar-10-batches-py/: five pickled training batches, test_batch and batches.meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else n_train
        batch = {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "labels": (np.arange(n) % 10).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))


def write_dtd(root: Path, per_split: int = 4) -> None:
    """dtd/dtd/images/<class>/*.jpg and dtd/dtd/labels/{train,val,test}1.txt."""
    data = root / "dtd" / "dtd"
    (data / "labels").mkdir(parents=True)
    for s, split in enumerate(("train", "val", "test")):
        lines = []
        for c, cls in enumerate(CLASSES):
            for i in range(per_split):
                name = f"{cls}_{s}{i:03d}.jpg"
                write_jpg(data / "images" / cls / name, seed=100 * s + 10 * c + i)
                lines.append(f"{cls}/{name}")
        (data / "labels" / f"{split}1.txt").write_text("\n".join(lines) + "\n")


def write_food101(root: Path, n_train: int = 6, n_test: int = 3) -> None:
    """food-101/images/<class>/<id>.jpg, food-101/meta/{train,test}.json and classes.txt."""
    base = root / "food-101"
    (base / "meta").mkdir(parents=True)
    image_id = 0
    for split, n in (("train", n_train), ("test", n_test)):
        meta = {}
        for cls in CLASSES:
            meta[cls] = []
            for _ in range(n):
                image_id += 1
                write_jpg(base / "images" / cls / f"{image_id}.jpg", seed=image_id)
                meta[cls].append(f"{cls}/{image_id}")
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta))
    (base / "meta" / "classes.txt").write_text("\n".join(CLASSES) + "\n")


def write_flowers102(root: Path) -> None:
    """flowers-102/jpg/image_XXXXX.jpg, imagelabels.mat (1-based labels) and setid.mat (trnid, valid, tstid)."""
    from scipy.io import savemat

    base = root / "flowers-102"
    n = 24
    for i in range(1, n + 1):
        write_jpg(base / "jpg" / f"image_{i:05d}.jpg", seed=i)
    savemat(base / "imagelabels.mat", {"labels": np.arange(n) % 3 + 1})
    ids = np.arange(1, n + 1)
    savemat(base / "setid.mat", {"trnid": ids[:12], "valid": ids[12:18], "tstid": ids[18:]})


def write_image_folder(root: Path, with_val: bool = False) -> None:
    """root/{train,val,test}/<class>/*.png."""
    for split, n in (("train", 6), ("val", 2), ("test", 2)):
        if split == "val" and not with_val:
            continue
        for c, cls in enumerate(CLASSES):
            for i in range(n):
                write_jpg(root / split / cls / f"{i}.png", seed=100 * c + i)


@pytest.fixture
def no_md5(monkeypatch):
    """torchvision checks the real files' md5 sums; the tiny copies cannot match them."""
    monkeypatch.setattr(cifar_module, "check_integrity", lambda path, md5=None: True)
    monkeypatch.setattr(datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(flowers_module, "check_integrity", lambda path, md5=None: True)


#: add-on name -> (data module, writer of a tiny copy, stored (train, val, test) sizes; val None: held out)
SETS = {
    "cifar10": (CIFAR10DataModule, write_cifar10, (50, None, 8)),
    "dtd": (DTDDataModule, write_dtd, (12, 12, 12)),
    "food101": (Food101DataModule, write_food101, (18, None, 9)),
    "flowers102": (Flowers102DataModule, write_flowers102, (12, 6, 6)),
    "imagefolder": (ImageFolderDataModule, write_image_folder, (18, None, 6)),
    "cifar100": (None, write_tiny_cifar100, (60, None, 20)),
}
VAL_SIZE = 5


def build(name: str, root: Path, **kwargs):
    cls = SETS[name][0]
    defaults = {"root": str(root), "batch_size": 4, "num_workers": 0, "val_size": VAL_SIZE, "image_size": 16}
    dm = cls(**{**defaults, "normalization": "half", **kwargs})
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("name", [n for n in SETS if n != "cifar100"])
def test_dataset_builds_from_its_real_format_with_exact_splits(name, tmp_path, no_md5):
    _, write, (n_train, n_val, n_test) = SETS[name]
    write(tmp_path)
    dm = build(name, tmp_path)
    sizes = [len(dm.dataset(s)) for s in ("train", "val", "test")]
    if n_val is None:  # held out of train
        assert sizes == [n_train - VAL_SIZE, VAL_SIZE, n_test]
        train, val = dm.dataset("train").indices, dm.dataset("val").indices
        assert not set(train) & set(val) and sorted(train + val) == list(range(n_train))
        again = build(name, tmp_path)
        assert again.dataset("val").indices == val  # fixed by the seed
        other = build(name, tmp_path, split_seed=1)
        assert other.dataset("val").indices != val
    else:
        assert sizes == [n_train, n_val, n_test]
    image, label = dm.dataset("val")[0]
    assert image.shape == (3, 16, 16) and 0 <= label < dm.num_classes
    assert image.min() >= -1 and image.max() <= 1  # half normalisation
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == (3, 16, 16) and y.dtype == torch.long


def test_image_folder_uses_its_own_val_and_trains_classes(tmp_path):
    write_image_folder(tmp_path, with_val=True)
    dm = build("imagefolder", tmp_path)
    assert dm.num_classes == 3
    assert [len(dm.dataset(s)) for s in ("train", "val", "test")] == [18, 6, 6]
    (tmp_path / "test" / "other").mkdir()
    write_jpg(tmp_path / "test" / "other" / "x.png", 0)
    with pytest.raises(ValueError, match=r"classes that 'train/' lacks: \['other'\]"):
        build("imagefolder", tmp_path)


def test_image_folder_without_test_is_a_one_line_error(tmp_path):
    write_image_folder(tmp_path)
    for path in sorted((tmp_path / "test").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (tmp_path / "test").rmdir()
    with pytest.raises(FileNotFoundError, match=r"no folder .*test'.*--data.root"):
        build("imagefolder", tmp_path)


def test_backbone_normalisation_reads_timms_pretrained_config(tmp_path):
    assert backbone_stats("vit_base_patch16_224.dino") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert backbone_stats("vit_base_patch16_224") == ((0.5,) * 3, (0.5,) * 3)  # timm's default tag: augreg
    write_image_folder(tmp_path)
    dm = ImageFolderDataModule(
        root=str(tmp_path), normalization="backbone", backbone="vit_base_patch16_224.dino"
    )
    assert dm.normalization_stats() == backbone_stats("vit_base_patch16_224.dino")
    with pytest.raises(ValueError, match="needs the backbone's name"):
        ImageFolderDataModule(root=str(tmp_path)).normalization_stats()
    with pytest.raises(ValueError, match="no pretrained config .* 'no_such_vit'"):
        backbone_stats("no_such_vit")
    with pytest.raises(ValueError, match="cannot be downloaded"):
        ImageFolderDataModule(root=str(tmp_path), download=True)


def tiny_options(tmp_path: Path, name: str, root: Path, steps: int = 2) -> list[str]:
    options = {
        "model.init_args.backbone": "vit_base_patch16_224",
        "model.init_args.pretrained": "false",
        "model.init_args.backbone_kwargs": TINY12,
        "lr_scheduler.init_args.warmup_steps": "1",
        "data.init_args.root": str(root),
        "data.init_args.batch_size": "4",
        "data.init_args.num_workers": "0",
        "data.init_args.image_size": "32",
        "data.init_args.val_size": str(VAL_SIZE),
        **tiny_trainer_options(tmp_path, steps),
    }
    return ["--config", str(ROOT / "configs" / "data" / f"{name}.yaml")] + [
        item for key, value in options.items() for item in (f"--{key}", value)
    ]


def test_there_is_one_add_on_per_dataset():
    assert {p.stem for p in ADD_ONS} == set(SETS)


@pytest.mark.parametrize("name", sorted(SETS))
def test_missing_dataset_is_a_one_line_error_naming_folder_and_option(name, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    argv = ["fit", "--config", str(ROOT / "configs" / "lora.yaml"), *tiny_options(tmp_path, name, missing)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err, err
    option = "--data.root" if name == "imagefolder" else "--data.download true"
    assert option in err, err
    assert not (tmp_path / "runs").exists()  # nothing written before the check


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_method_config_composes_with_every_data_add_on(config, tmp_path, no_md5):
    for name in sorted(SETS):
        root = tmp_path / name
        SETS[name][1](root)
        cli = run_lightning(["--config", str(config), *tiny_options(tmp_path, name, root)], run=False)
        cls = SETS[name][0] or type(cli.datamodule)
        assert isinstance(cli.datamodule, cls)
        assert cli.model.hparams.num_classes == cli.datamodule.num_classes
        if name != "cifar100":
            assert cli.datamodule.hparams.normalization == "backbone"
            assert cli.datamodule.hparams.backbone == "vit_base_patch16_224"  # linked from the model


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SETS))
def test_two_step_fit_on_each_dataset(name, tmp_path, no_md5, monkeypatch):
    monkeypatch.setattr(datasets.CIFAR100, "_check_integrity", lambda self: True)
    root = tmp_path / name
    SETS[name][1](root)
    config = str(ROOT / "configs" / "lora.yaml")
    cli = run_lightning(["fit", "--config", config, *tiny_options(tmp_path, name, root)])
    assert cli.trainer.global_step == 2 and "val/acc1" in cli.trainer.callback_metrics
    # the run's config.yaml rebuilds the same data (the backbone link included) for `ftforget test`
    assert main(["test", "--run", cli.trainer.log_dir]) == 0
