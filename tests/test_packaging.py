"""The configs ship inside the wheel from one source, and every shipped YAML is one the CLI tests parse."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ftforget import resources
from ftforget.sweep import PEFT_CONFIGS
from tests.test_cli import CONFIGS

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "ftforget" / "configs"
DEMO_METHODS = ("full", "top1", "linear", "lora", "block_expansion", "full_l2sp")


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.yaml"))


def test_the_clones_configs_are_the_packages():
    assert (ROOT / "configs").is_symlink() and (ROOT / "configs").resolve() == SOURCE
    assert resources.config_dir() == SOURCE and resources.demo_config_dir() == SOURCE / "demo"
    assert resources.defaults_config() == SOURCE / "defaults.yaml"


def test_every_shipped_yaml_is_parsed_by_a_cli_test():
    # test_cli parses each paper config alone, forgetting.yaml with lora.yaml, and every run reads
    # defaults.yaml; test_demo parses each demo method's config with common.yaml.
    assert _names(SOURCE) == sorted([p.name for p in CONFIGS] + ["defaults.yaml", "forgetting.yaml"])
    assert _names(SOURCE / "demo") == sorted([f"{m}.yaml" for m in DEMO_METHODS] + ["common.yaml"])
    # test_peft_methods parses each configs/peft/ file alone and each configs/demo/peft/ one with common.yaml
    assert (
        _names(SOURCE / "peft")
        == _names(SOURCE / "demo" / "peft")
        == sorted(f"{c}.yaml" for c in PEFT_CONFIGS)
    )
    # test_stream loads the stream file and fits a short version of it; test_stream_anchor builds every
    # task of the stream with the distillation overlay
    assert _names(SOURCE / "stream") == ["digits.yaml", "distill.yaml"]


CHECK = """
import json, sys
from pathlib import Path
import yaml
import ftforget
from ftforget import resources
paper, demo = resources.config_dir(), resources.demo_config_dir()
print(json.dumps({
    "file": ftforget.__file__,
    "paper": {p.name: yaml.safe_load(p.read_text()) for p in sorted(paper.glob("*.yaml"))},
    "demo": {p.name: yaml.safe_load(p.read_text()) for p in sorted(demo.glob("*.yaml"))},
    "defaults": str(resources.defaults_config()),
}))
"""


@pytest.mark.slow
def test_wheel_ships_the_configs(tmp_path):
    # Build from a copy: the build writes build/ and *.egg-info next to the sources.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "ftforget", src / "ftforget", ignore=shutil.ignore_patterns("__pycache__"))
    os.symlink("ftforget/configs", src / "configs")  # as in a clone
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    wheels, target = tmp_path / "wheels", tmp_path / "installed"
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", str(src), "-w", str(wheels)]
    subprocess.run(build, check=True, capture_output=True, text=True, timeout=300)
    [wheel] = wheels.glob("ftforget-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert all(n.startswith(("ftforget/", "ftforget-")) for n in names)  # no second, top-level copy
    assert sum(n.startswith("ftforget/configs/") and n.endswith(".yaml") for n in names) == len(
        _names(SOURCE)
    ) + sum(len(_names(SOURCE / d)) for d in ("demo", "data", "backbones", "peft", "demo/peft", "stream"))
    install = [*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)]
    subprocess.run(install, check=True, capture_output=True, text=True, timeout=300)

    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    proc = subprocess.run(
        [sys.executable, "-c", CHECK], cwd=empty, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout)
    assert Path(found["file"]).resolve().is_relative_to(target.resolve())
    assert Path(found["defaults"]).resolve() == (target / "ftforget" / "configs" / "defaults.yaml").resolve()
    assert sorted(found["paper"]) == _names(SOURCE) and sorted(found["demo"]) == _names(SOURCE / "demo")
    assert all(isinstance(content, dict) for content in [*found["paper"].values(), *found["demo"].values()])
    for shipped in (target / "ftforget" / "configs").rglob("*.yaml"):  # byte for byte the sources
        assert (
            shipped.read_bytes()
            == (SOURCE / shipped.relative_to(target / "ftforget" / "configs")).read_bytes()
        )
    assert found["paper"]["lora.yaml"]["model"]["class_path"] == "ftforget.methods.LoRA"
    assert found["demo"]["common.yaml"]["model"]["init_args"]["backbone_kwargs"]["depth"] == 4

    # The installed console script runs the demo from an empty directory, with nothing of the clone.
    script = target / "bin" / "ftforget"
    assert script.is_file()
    demo = subprocess.run(
        [sys.executable, str(script), "demo", "--steps", "20"],
        cwd=empty, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "| full fine-tuning |" in demo.stdout and "| Block Expansion p=1 |" in demo.stdout
    assert (empty / "runs" / "demo" / "report" / "forgetting_table.md").is_file()
    assert str(target) not in demo.stdout  # the run's files are in the working directory, not the package
