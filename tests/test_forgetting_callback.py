"""ForgettingCallback in real (tiny, CPU) fits: steps, logs, invisibility to training, resume, shortcuts."""

from __future__ import annotations

import random
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ftforget.forgetting.callback as callback_module
import ftforget.forgetting.features as features_module
from ftforget.data.imagenet import ImageNetProbe
from ftforget.forgetting import (
    DEFAULT_EVAL_STEPS,
    ForgettingCallback,
    KNNConfig,
    evaluate_probe,
)
from ftforget.forgetting.cache import FeatureCache, feature_fingerprint
from ftforget.inference import measurement_mode
from ftforget.methods import FullFineTuning, LinearProbing, LoRA
from tests.forgetting_helpers import (
    LossRecorder,
    SyntheticProbe,
    TinyData,
    fit_and_die,
    make_trainer,
    read_jsonl,
    tiny_model,
    worker_context,
)

RECORD_KEYS = [
    "step", "epoch", "probe", "k", "temperature", "top1", "top5", "drop_abs", "drop_rel",
    "new_task_val_acc1", "num_queries", "num_bank", "seconds", "top1_ci", "drop_abs_ci",
    "probe_seconds", "num_images", "images_per_s", "elapsed", "probe_seconds_total",
]  # fmt: skip


def run_fit(
    root: Path, max_steps: int = 12, callback: ForgettingCallback | None = None, cls=FullFineTuning, **kw
):
    """A seeded tiny fit; returns (losses, model)."""
    L.seed_everything(0)
    model = tiny_model(cls)
    recorder = LossRecorder()
    callbacks = [recorder] + ([callback] if callback else [])
    make_trainer(root, max_steps, callbacks, **kw).fit(model, datamodule=TinyData(probe=SyntheticProbe()))
    return recorder.losses, model


def small_callback(**kwargs) -> ForgettingCallback:
    knn = {"k": 5, "batch_size": 16, "num_workers": 0, **kwargs.pop("knn", {})}
    return ForgettingCallback(knn=KNNConfig(**knn), **kwargs)


def test_defaults() -> None:
    cb = ForgettingCallback()
    assert (
        cb.eval_at_steps
        == list(DEFAULT_EVAL_STEPS)
        == [0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
    )
    assert cb.config.k == [20] and cb.config.temperature == 0.07
    assert ForgettingCallback(eval_at_steps=[7, 3]).eval_at_steps == [
        0,
        3,
        7,
    ]  # step 0 is the drops' reference
    due = ForgettingCallback(eval_at_steps=[5], every_n_steps=4)
    assert [s for s in range(13) if due.is_due(s)] == [0, 4, 5, 8, 12]


def test_logs_exactly_the_requested_steps(tmp_path: Path) -> None:
    callback = small_callback(eval_at_steps=[1, 2, 5, 10, 20], knn={"k": [5, 3]})
    run_fit(tmp_path, 12, callback)
    run_dir = tmp_path / "run" / "version_0"
    events = EventAccumulator(str(run_dir)).Reload()
    steps = {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    for tag in (
        "knn_top1",
        "knn_top5",
        "knn_top1_k3",
        "knn_top5_k3",
        "drop_abs",
        "drop_rel",
        "new_task_val_acc1",
    ):
        assert steps[f"forgetting/{tag}"] == [0, 1, 2, 5, 10], tag
    assert "forgetting/knn_top1_k5" not in steps  # the first k has the plain name
    records = read_jsonl(run_dir / "forgetting.jsonl")
    assert [(r["step"], r["k"]) for r in records] == [(s, k) for s in (0, 1, 2, 5, 10) for k in (5, 3)]
    assert all(list(r) == RECORD_KEYS for r in records)
    base = {r["k"]: r["top1"] for r in records if r["step"] == 0}
    top1 = {e.step: e.value for e in events.Scalars("forgetting/knn_top1")}
    for r in records:
        assert r["probe"] == "synthetic" and (r["num_queries"], r["num_bank"]) == (23, 37)
        assert r["top1"] * 23 == pytest.approx(round(r["top1"] * 23)) and 0 <= r["top1"] <= r["top5"] <= 1
        assert r["drop_abs"] == base[r["k"]] - r["top1"]
        assert r["drop_rel"] == r["drop_abs"] / base[r["k"]]
        assert r["new_task_val_acc1"] * 15 == pytest.approx(round(r["new_task_val_acc1"] * 15))
        if r["k"] == 5:
            assert top1[r["step"]] == pytest.approx(r["top1"], abs=1e-7)  # TensorBoard stores float32
    assert records[0]["drop_abs"] == 0.0 and records[0]["epoch"] == 0 and records[-1]["epoch"] == 1


def test_step0_equals_a_direct_measurement_of_the_initial_model(tmp_path: Path) -> None:
    callback = small_callback(eval_at_steps=[0], new_task_val=False)
    run_fit(tmp_path, 1, callback)
    model = tiny_model()  # the same seed, so the same weights as the fit's model at step 0
    probe = SyntheticProbe()
    probe.setup()
    with measurement_mode(model):
        direct = evaluate_probe(
            model.features, probe, KNNConfig(k=[5], batch_size=16, num_workers=0), model.device
        )
    (record,) = read_jsonl(tmp_path / "run" / "version_0" / "forgetting.jsonl")
    assert (record["top1"], record["top5"]) == (direct.top1[5], direct.top5[5])


@contextmanager
def _leaky_measurement_mode(module: torch.nn.Module):
    """measurement_mode without the random-state restore: what the real one must prevent."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    with torch.no_grad():
        yield
    for m, flag in flags:
        m.training = flag


def test_training_is_bit_identical_with_and_without_the_callback(tmp_path: Path, monkeypatch) -> None:
    without, model_a = run_fit(tmp_path / "a", 12)
    steps = [0, 1, 2, 5, 7, 10]
    with_cb, model_b = run_fit(tmp_path / "b", 12, small_callback(eval_at_steps=steps))
    assert len(without) == 12 and with_cb == without  # exact float equality, step by step
    for (name, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    # The check has teeth: a measurement that leaks RNG state changes the trajectory.
    monkeypatch.setattr(callback_module, "measurement_mode", _leaky_measurement_mode)
    leaky, _ = run_fit(tmp_path / "c", 12, small_callback(eval_at_steps=steps))
    assert leaky != without


def test_measurement_mode_restores_flags_and_random_states() -> None:
    model = tiny_model(LoRA)
    model.train()
    model.backbone.blocks[0].eval()  # a deliberately frozen submodule must stay in eval mode
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    with measurement_mode(model):
        assert not model.training and not torch.is_grad_enabled()
        assert all(layer.merged for layer in model.lora_layers)  # LoRA is measured merged
        random.random(), np.random.rand(), torch.rand(5)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
    assert model.training and model.head.training and not model.backbone.blocks[0].training
    assert not any(layer.merged for layer in model.lora_layers)


@pytest.mark.slow
def test_resume_after_a_kill_measures_each_step_once(tmp_path: Path) -> None:
    steps = [0, 1, 2, 3, 5, 8]
    proc = worker_context().Process(target=fit_and_die, args=(str(tmp_path), steps, 5))
    proc.start()
    proc.join(120)
    assert proc.exitcode == -9, "the fit should have been SIGKILLed at step 5"
    log = tmp_path / "run" / "version_0" / "forgetting.jsonl"
    assert [r["step"] for r in read_jsonl(log)] == [0, 1, 2, 3, 5]  # step 5 was measured, not checkpointed
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 4
    L.seed_everything(0)
    callback = small_callback(eval_at_steps=steps)
    trainer = make_trainer(tmp_path, 9, [callback])
    trainer.fit(tiny_model(), datamodule=TinyData(probe=SyntheticProbe()), ckpt_path=str(ckpt))
    records = read_jsonl(log)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 5, 8]
    assert all(r["drop_abs"] == records[0]["top1"] - r["top1"] for r in records)  # the baseline survived


def test_state_dict_round_trip(tmp_path: Path) -> None:
    callback = small_callback(eval_at_steps=[0, 2])
    run_fit(tmp_path, 3, callback)
    fresh = small_callback(eval_at_steps=[0, 2])
    fresh.load_state_dict(callback.state_dict())
    assert fresh.records == callback.records and fresh.baseline == callback.baseline
    assert fresh.measured_steps == {0, 2} and not fresh.is_due(2) and fresh.is_due(0) is False


@pytest.mark.parametrize(("cls", "calls"), [(LinearProbing, 1), (FullFineTuning, 4)])
def test_unchanged_backbone_reuses_step_0(tmp_path: Path, monkeypatch, cls: type, calls: int) -> None:
    counted = []
    real = callback_module.evaluate_probe
    monkeypatch.setattr(
        callback_module, "evaluate_probe", lambda *a, **kw: counted.append(1) or real(*a, **kw)
    )
    run_fit(tmp_path / "reuse", 3, small_callback(eval_at_steps=[1, 2, 3]), cls=cls)
    assert len(counted) == calls
    reused = read_jsonl(tmp_path / "reuse" / "run" / "version_0" / "forgetting.jsonl")
    if cls is LinearProbing:
        # The shortcut is exact: recomputing every step gives the same numbers.
        run_fit(tmp_path / "full", 3, small_callback(eval_at_steps=[1, 2, 3], reuse_unchanged=False), cls=cls)
        recomputed = read_jsonl(tmp_path / "full" / "run" / "version_0" / "forgetting.jsonl")
        assert len(counted) == 1 + 4
        assert [(r["top1"], r["top5"]) for r in reused] == [(r["top1"], r["top5"]) for r in recomputed]
        assert len({r["top1"] for r in reused}) == 1
        assert len({r["new_task_val_acc1"] for r in reused}) > 1  # the head trains: measured every time


def test_feature_cache_is_reused_across_runs(tmp_path: Path, monkeypatch) -> None:
    probe = SyntheticProbe()
    probe.setup()
    model = tiny_model()
    config = KNNConfig(k=[5], batch_size=16, num_workers=0)
    cache = FeatureCache(tmp_path / "cache")
    fingerprint = feature_fingerprint(model)
    with measurement_mode(model):
        first = evaluate_probe(model.features, probe, config, model.device, fingerprint, cache)
        monkeypatch.setattr(features_module, "extract_features", lambda *a, **kw: pytest.fail("cache missed"))
        second = evaluate_probe(model.features, probe, config, model.device, fingerprint, cache)
    assert not first.cached and second.cached
    assert (first.top1, first.top5) == (second.top1, second.top5)
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == 2  # bank and queries of the only rank
    # The linear probe's backbone fingerprint ignores the head; the full module's would not.
    head_changed = tiny_model(LinearProbing)
    before = feature_fingerprint(head_changed)
    head_changed.head.weight.data += 1
    assert feature_fingerprint(head_changed) == before
    head_changed.backbone.norm.weight.data[0] += 1e-7
    assert feature_fingerprint(head_changed) != before


def test_probe_argument_wins_over_the_data_modules(tmp_path: Path) -> None:
    run_fit(tmp_path, 1, small_callback(eval_at_steps=[0], probe=SyntheticProbe(n_bank=11, n_query=9)))
    (record,) = read_jsonl(tmp_path / "run" / "version_0" / "forgetting.jsonl")
    assert (record["num_bank"], record["num_queries"]) == (11, 9)


def _fit_expecting(tmp_path: Path, error: type, match: str, callback: ForgettingCallback, probe) -> None:
    recorder = LossRecorder()
    with pytest.raises(error, match=match):
        make_trainer(tmp_path, 3, [recorder, callback]).fit(tiny_model(), datamodule=TinyData(probe=probe))
    assert recorder.losses == []  # failed before the first training step


def test_no_probe_fails_at_setup(tmp_path: Path) -> None:
    _fit_expecting(tmp_path, ValueError, "ForgettingCallback has no probe", small_callback(), None)


def test_bad_imagenet_path_fails_before_training(tmp_path: Path) -> None:
    probe = ImageNetProbe(root=str(tmp_path / "no_imagenet"))
    _fit_expecting(tmp_path, FileNotFoundError, "no_imagenet", small_callback(), probe)


def test_k_larger_than_the_bank_fails_at_setup(tmp_path: Path) -> None:
    _fit_expecting(
        tmp_path,
        ValueError,
        "knn.k=50 exceeds the probe's bank size 37",
        small_callback(knn={"k": 50}),
        SyntheticProbe(),
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eval_at_steps": [-1]}, "eval_at_steps must be >= 0"),
        ({"every_n_steps": 0}, "every_n_steps must be >= 1"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ForgettingCallback(**kwargs)
