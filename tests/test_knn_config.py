"""One typed object for the probe's settings: the same defaults and the same errors everywhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftforget.commands import main
from ftforget.commands.measure import build_parser
from ftforget.forgetting import ForgettingCallback
from ftforget.forgetting.config import DEFAULT_EVAL_STEPS, KNNConfig, eval_steps_until

DEMO = Path(__file__).resolve().parent.parent / "configs" / "demo"

BAD = [
    ("k", "[5, 0]"),
    ("temperature", "-1"),
    ("batch_size", "0"),
    ("num_workers", "-1"),
    ("bank_dtype", "float8"),
    ("autocast_dtype", "int8"),
    ("query_chunk", "0"),
    ("bank_chunk", "0"),
]


@pytest.mark.parametrize(("key", "value"), BAD)
def test_measure_and_the_callback_reject_the_same_values_naming_the_key(key, value, capsys) -> None:
    assert main(["measure", "--backbone", "vit_base_patch16_224", f"--knn.{key}", value]) == 2
    measure_err = capsys.readouterr().err
    assert f"knn.{key}" in measure_err and measure_err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_info:
        main([
            "fit", "--config", str(DEMO / "full.yaml"), "--config", str(DEMO / "common.yaml"),
            f"--trainer.callbacks.knn.{key}", value, "--print_config",
        ])  # fmt: skip
    assert exit_info.value.code != 0
    assert f"knn.{key}" in capsys.readouterr().err


@pytest.mark.parametrize(("key", "value"), [("k", [5, 0]), ("temperature", -1.0), ("batch_size", 0),
                                            ("num_workers", -1), ("bank_dtype", "float8")])  # fmt: skip
def test_python_construction_names_the_key(key, value) -> None:
    with pytest.raises(ValueError, match=f"knn.*{key}"):
        KNNConfig(**{key: value})


def test_one_set_of_defaults() -> None:
    parser = build_parser()
    cfg = parser.parse_args(["--backbone", "x", "--probe.root", "x"])
    assert parser.instantiate_classes(cfg).knn == KNNConfig() == ForgettingCallback().config
    assert ForgettingCallback().eval_at_steps == list(DEFAULT_EVAL_STEPS)
    # Plain python values: checkpoints holding them load with weights_only=True.
    parsed = parser.instantiate_classes(
        parser.parse_args(["--backbone", "x", "--probe.root", "x", "--knn.temperature", "0.1"])
    ).knn
    assert type(parsed.temperature) is float and type(parsed.batch_size) is int


def test_eval_steps_until() -> None:
    assert eval_steps_until(300) == [0, 1, 2, 5, 10, 20, 50, 100, 200, 300]
    assert eval_steps_until(10000) == list(DEFAULT_EVAL_STEPS)
