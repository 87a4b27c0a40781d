"""Where the configs shipped with ftforget are, in a clone, an editable install and a wheel alike.

The YAMLs live in the package (``ftforget/configs``, package data of the wheel); a clone's top-level
``configs`` is a symlink to that directory, so ``--config configs/lora.yaml`` works from a clone and
:func:`config_dir` from anywhere.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def config_dir() -> Path:
    """The directory of the paper's configs: one YAML per table row, ``defaults.yaml``, ``forgetting.yaml``."""
    return _PACKAGE_DIR / "configs"


def demo_config_dir() -> Path:
    """The directory of the embedded demo's configs: one YAML per method and ``common.yaml``."""
    return config_dir() / "demo"


def defaults_config() -> Path:
    """The YAML every ``ftforget fit|validate|test|predict`` starts from: the paper's shared recipe."""
    return config_dir() / "defaults.yaml"
