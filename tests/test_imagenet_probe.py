"""The ImageNet-1k probe on tiny image trees, its errors, and ``ftforget measure``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from ftforget.backbones import build_backbone
from ftforget.commands.measure import main as measure_main
from ftforget.data.image_folders import UnreadableImageError
from ftforget.data.imagenet import ImageNetProbe
from ftforget.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from ftforget.forgetting import KNNConfig, evaluate_probe
from ftforget.forgetting.features import extract_features
from ftforget.inference import BackboneModel, measurement_mode
from ftforget.methods import FullFineTuning, LoRA
from ftforget.methods.registry import load_method
from ftforget.methods.schedule import paper_recipe
from tests.forgetting_helpers import TinyData, make_trainer
from tests.tiny import SHALLOW

WNIDS = ["n01440764", "n01443537", "n01484850"]


def write_jpeg(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    color = rng.integers(0, 255, size=3)
    pixels = np.clip(color + rng.integers(-40, 40, size=(40, 48, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG")


def make_tree(root: Path, n_train: int = 4, n_val: int = 2, flat_val: bool = False, wnids=WNIDS) -> Path:
    """``root/train/<wnid>/*.JPEG`` and a val tree, or a flat val plus ``LOC_val_solution.csv``."""
    rows = ["ImageId,PredictionString"]
    for c, wnid in enumerate(wnids):
        for i in range(n_train):
            write_jpeg(root / "train" / wnid / f"{wnid}_{i}.JPEG", seed=100 * c + i)
        for i in range(n_val):
            if flat_val:
                image_id = f"ILSVRC2012_val_{c * n_val + i + 1:08d}"
                write_jpeg(root / "val" / f"{image_id}.JPEG", seed=10_000 + 100 * c + i)
                rows.append(f"{image_id},{wnid} 10 20 30 40 {wnid} 1 2 3 4")
            else:
                write_jpeg(root / "val" / wnid / f"ILSVRC2012_val_{c}{i}.JPEG", seed=10_000 + 100 * c + i)
    if flat_val:
        (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    return root


def tiny_probe(root: Path, **kwargs) -> ImageNetProbe:
    probe = ImageNetProbe(root=str(root), resize_size=37, crop_size=32, **kwargs)
    probe.setup()
    return probe


def test_tree_layout_items_labels_and_transform(tmp_path: Path) -> None:
    probe = tiny_probe(make_tree(tmp_path))
    assert probe.num_classes == 3 and probe.classes == WNIDS
    bank, queries = probe.bank_dataset(), probe.query_dataset()
    assert (len(bank), len(queries)) == (12, 6)
    image, label, index = bank[5]
    assert (label, index) == (1, 5) and image.shape == (3, 32, 32)
    expected = eval_transform(37, 32)(
        Image.open(tmp_path / "train" / WNIDS[1] / f"{WNIDS[1]}_1.JPEG").convert("RGB")
    )
    assert torch.equal(image, expected)
    assert [queries[i][1] for i in range(6)] == [0, 0, 1, 1, 2, 2]


def test_default_transform_is_dinos() -> None:
    resize, crop, _, norm = eval_transform().transforms
    assert resize.size == 256 and resize.interpolation == transforms.InterpolationMode.BICUBIC
    assert crop.size == (224, 224)
    assert tuple(norm.mean) == IMAGENET_MEAN == (0.485, 0.456, 0.406) and tuple(norm.std) == IMAGENET_STD


def test_flat_val_with_loc_csv(tmp_path: Path) -> None:
    root = make_tree(tmp_path, flat_val=True)
    probe = tiny_probe(root, val_labels=str(root / "LOC_val_solution.csv"))
    queries = probe.query_dataset()
    assert len(queries) == 6 and [queries[i][1] for i in range(6)] == [0, 0, 1, 1, 2, 2]
    assert Path(probe._queries[2][0]).name == "ILSVRC2012_val_00000003.JPEG"


def test_fixed_seed_subsets(tmp_path: Path) -> None:
    root = make_tree(tmp_path, n_train=6, n_val=3)
    a = tiny_probe(root, bank_per_class=2, queries_per_class=1, seed=0)
    assert (len(a.bank_dataset()), len(a.query_dataset())) == (6, 3)
    assert a._bank == tiny_probe(root, bank_per_class=2, queries_per_class=1, seed=0)._bank
    assert a._bank != tiny_probe(root, bank_per_class=2, queries_per_class=1, seed=1)._bank
    for path, label in a._bank:
        assert Path(path).parent.name == WNIDS[label]
    assert [label for _, label in a._bank] == [0, 0, 1, 1, 2, 2]
    assert len(tiny_probe(root, bank_per_class=100)._bank) == 18  # a class smaller than n gives all it has


def test_cache_key_tracks_data_and_transform_not_location(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "a")
    key = tiny_probe(root).cache_key()
    assert key == tiny_probe(root).cache_key()
    shutil.copytree(root, tmp_path / "b")
    assert tiny_probe(tmp_path / "b").cache_key() == key
    assert tiny_probe(root, bank_per_class=2).cache_key() != key
    other = ImageNetProbe(root=str(root), resize_size=40, crop_size=32)
    other.setup()
    assert other.cache_key() != key


# ------------------------------------------------------------------------------------------- errors
def test_missing_root_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="root directory .*nowhere"):
        tiny_probe(tmp_path / "nowhere")


def test_missing_train_dir_is_named(tmp_path: Path) -> None:
    root = make_tree(tmp_path)
    shutil.rmtree(root / "train")
    with pytest.raises(FileNotFoundError, match=f"train directory '{root / 'train'}' does not exist"):
        tiny_probe(root)


def test_tree_without_class_dirs_is_named(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "train" / "img.JPEG", 0)
    make_tree(tmp_path / "x")
    shutil.move(tmp_path / "x" / "val", tmp_path / "val")
    with pytest.raises(
        ValueError, match=f"train directory '{tmp_path / 'train'}' has no class sub-directories"
    ):
        tiny_probe(tmp_path)


def test_empty_class_dir_is_named(tmp_path: Path) -> None:
    root = make_tree(tmp_path)
    (root / "train" / "n09999999").mkdir()
    with pytest.raises(ValueError, match="n09999999' contains no images"):
        tiny_probe(root)


def test_flat_val_without_labels_is_explained(tmp_path: Path) -> None:
    root = make_tree(tmp_path, flat_val=True)
    with pytest.raises(ValueError, match=f"val directory '{root / 'val'}' holds images directly.*val_labels"):
        tiny_probe(root)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("image,label\nILSVRC2012_val_00000001,n01440764\n", "must start with the header"),
        ("ImageId,PredictionString\nILSVRC2012_val_00000001,\n", "line 2 is malformed"),
        ("ImageId,PredictionString\nILSVRC2012_val_00000099,n01440764 1 2 3 4\n", "are not in"),
        ("", "must start with the header"),
    ],
)
def test_malformed_labels_file_is_named(tmp_path: Path, content: str, message: str) -> None:
    root = make_tree(tmp_path, flat_val=True)
    labels = root / "LOC_val_solution.csv"
    labels.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        tiny_probe(root, val_labels=str(labels))
    assert str(labels) in str(info.value)


def test_missing_labels_file_is_named(tmp_path: Path) -> None:
    root = make_tree(tmp_path, flat_val=True)
    with pytest.raises(FileNotFoundError, match="val_labels file .*missing.csv"):
        tiny_probe(root, val_labels=str(root / "missing.csv"))


def test_bank_class_absent_from_val_is_named(tmp_path: Path) -> None:
    root = make_tree(tmp_path)
    write_jpeg(root / "train" / "n09999999" / "a.JPEG", 1)
    with pytest.raises(
        ValueError, match=r"1 classes of '.*train' are absent from '.*val', e\.g\. \['n09999999'\]"
    ):
        tiny_probe(root)


def test_val_class_absent_from_bank_is_named(tmp_path: Path) -> None:
    root = make_tree(tmp_path)
    shutil.rmtree(root / "train" / WNIDS[2])
    with pytest.raises(
        ValueError, match=rf"classes of '.*val' are absent from '.*train', e\.g\. \['{WNIDS[2]}'\]"
    ):
        tiny_probe(root)


def test_unreadable_image_names_the_file_when_loaded(tmp_path: Path) -> None:
    root = make_tree(tmp_path)
    bad = root / "train" / WNIDS[0] / f"{WNIDS[0]}_2.JPEG"
    bad.write_bytes(b"this is not a jpeg")
    probe = tiny_probe(root)  # the structure is fine: setup passes without decoding 1.28M files
    with pytest.raises(UnreadableImageError, match=f"cannot read image file '{bad}'"):
        probe.bank_dataset()[2]
    model = build_backbone("vit_base_patch16_224", **SHALLOW).eval()
    with pytest.raises(Exception, match=str(bad)):  # re-raised from a loader worker, file name intact
        extract_features(model, probe.bank_dataset(), 4, 1, torch.device("cpu"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "give root, or both train_dir and val_dir"),
        ({"root": "x", "bank_per_class": 0}, "bank_per_class must be >= 1"),
        ({"root": "x", "queries_per_class": -1}, "queries_per_class must be >= 1"),
        ({"root": "x", "crop_size": 300, "resize_size": 256}, "crop_size <= resize_size"),
    ],
)
def test_bad_options_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ImageNetProbe(**kwargs)


# ------------------------------------------------------------------------------------ ftforget measure
def _measure(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "out.json"
    root = tmp_path / "imagenet"
    common = [
        "--probe.root",
        str(root),
        "--knn.k",
        "[1, 3]",
        "--knn.batch_size",
        "4",
        "--knn.num_workers",
        "0",
    ]
    assert measure_main([*args, *common, "--output", str(out)]) == 0
    return json.loads(out.read_text())


def _direct(model: torch.nn.Module, root: Path) -> dict:
    probe = tiny_probe(root)
    with measurement_mode(model):
        result = evaluate_probe(
            model.features, probe, KNNConfig(k=[1, 3], batch_size=4, num_workers=0), torch.device("cpu")
        )
    return {k: (result.top1[k], result.top5[k]) for k in (1, 3)}


def _as_table(report: dict) -> dict:
    return {r["k"]: (r["top1"], r["top5"]) for r in report["results"]}


def test_measure_a_backbone_checkpoint(tmp_path: Path) -> None:
    make_tree(tmp_path / "imagenet")
    torch.manual_seed(0)
    backbone = build_backbone("vit_base_patch16_224", **SHALLOW)
    torch.save(backbone.state_dict(), tmp_path / "backbone.pth")
    report = _measure(
        tmp_path, "--backbone", "vit_base_patch16_224", "--checkpoint", str(tmp_path / "backbone.pth"),
        "--backbone_kwargs", json.dumps(SHALLOW),
    )  # fmt: skip
    assert report["num_queries"] == 6 and report["num_bank"] == 12 and report["probe"] == "imagenet1k"
    assert _as_table(report) == _direct(BackboneModel(backbone), tmp_path / "imagenet")


@pytest.mark.parametrize("cls", [FullFineTuning, LoRA])
def test_measure_a_method_checkpoint_equals_the_live_model(tmp_path: Path, cls: type) -> None:
    """The .ckpt is rebuilt as the right method (LoRA's keys differ) and measures what the live model does."""
    make_tree(tmp_path / "imagenet")
    torch.manual_seed(0)
    recipe = paper_recipe(lr=0.05, warmup_steps=0)
    model = cls(num_classes=5, **recipe, backbone="vit_base_patch16_224", backbone_kwargs=SHALLOW)
    L.seed_everything(0)
    trainer = make_trainer(tmp_path, 2, [], logger=False)
    trainer.fit(model, datamodule=TinyData())
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    report = _measure(tmp_path, "--ckpt_path", str(tmp_path / "m.ckpt"))
    assert report["source"].startswith("ckpt:")
    assert _as_table(report) == _direct(model, tmp_path / "imagenet")
    rebuilt = load_method(tmp_path / "m.ckpt")
    assert type(rebuilt) is cls
    for (name, a), (_, b) in zip(rebuilt.state_dict().items(), model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_measure_argument_errors(tmp_path: Path) -> None:
    make_tree(tmp_path / "imagenet")
    with pytest.raises(ValueError, match="exactly one of --ckpt_path and --backbone"):
        measure_main(["--probe.root", str(tmp_path / "imagenet")])  # neither source
    with pytest.raises(ValueError, match="exactly one of --ckpt_path and --backbone"):
        measure_main(["--ckpt_path", "a.ckpt", "--backbone", "vit_base_patch16_224", "--probe.root", "x"])
    with pytest.raises(FileNotFoundError, match="checkpoint '.*missing.ckpt' does not exist"):
        measure_main(
            ["--ckpt_path", str(tmp_path / "missing.ckpt"), "--probe.root", str(tmp_path / "imagenet")]
        )
