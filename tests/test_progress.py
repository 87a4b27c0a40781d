"""Progress the user can see, a quiet console, named crash checkpoints and machine-aware defaults."""

from __future__ import annotations

import inspect
import io
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import TensorDataset
from tqdm import tqdm

import ftforget.progress as progress
from ftforget import machine
from ftforget.cli import run_lightning
from ftforget.commands import main
from ftforget.data.cifar import CIFAR100DataModule
from ftforget.data.new_task import NewTaskDataModule
from ftforget.data.pixel_cache import PixelCacheDataset, build_pixel_cache
from ftforget.forgetting.config import KNNConfig
from ftforget.forgetting.features import extract_features
from ftforget.forgetting.sharded_knn import sharded_knn_hits
from ftforget.logging_setup import LEAFSPEC_WARNING, LIGHTNING_RANK_ZERO_LOGGER, silence_known_noise
from ftforget.methods import FullFineTuning
from ftforget.progress import PROGRESS_ENV, StepProgressBar, progress_bar, progress_enabled
from tests.helpers import RandomImages, quiet_trainer
from tests.test_cli import tiny_overrides
from tests.tiny import TINY_ARGS

ROOT = Path(__file__).resolve().parents[1]


class RecordingTqdm(tqdm):
    """tqdm that remembers every bar made, to read their totals and counts after the loop."""

    made: list[RecordingTqdm] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.drawn = not self.disable  # close() disables every bar
        RecordingTqdm.made.append(self)


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def bars(monkeypatch) -> list[RecordingTqdm]:
    """The bars ftforget makes during a test, forced on (stderr is not a terminal under pytest)."""
    monkeypatch.setenv(PROGRESS_ENV, "1")
    RecordingTqdm.made = []
    monkeypatch.setattr(progress, "tqdm", RecordingTqdm)
    return RecordingTqdm.made


def _images(n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


def _extract(dataset: TensorDataset):
    return extract_features(lambda x: x.flatten(1), dataset, 8, 0, torch.device("cpu"), desc="bank")


# ------------------------------------------------------------------------------- the progress helper
def test_extraction_bar_counts_every_image_and_changes_nothing(bars, monkeypatch):
    dataset = _images(37)
    shown = _extract(dataset)
    (bar,) = bars
    assert (bar.total, bar.n, bar.desc, bar.unit, bar.leave, bar.drawn) == (
        37,
        37,
        "bank",
        "img",
        False,
        True,
    )
    monkeypatch.setenv(PROGRESS_ENV, "0")
    hidden = _extract(dataset)
    assert not bars[1].drawn
    for name in ("features", "labels", "indices"):
        assert torch.equal(getattr(shown, name), getattr(hidden, name))


def test_knn_bar_counts_every_query(bars):
    bank, queries = _extract(_images(40)), _extract(_images(23, seed=1))
    bars.clear()
    counts, _ = sharded_knn_hits(queries, bank, 3, [5], 0.07, query_chunk=4, bank_chunk=16)
    (bar,) = bars
    assert (bar.total, bar.n, bar.unit, bar.drawn) == (23, 23, "query", True)
    assert sum(counts[5]) > 0


def test_pixel_cache_bar_counts_every_image(bars, tmp_path):
    images = torch.randint(0, 256, (70, 8, 8, 3), dtype=torch.uint8)
    labels = list(range(70))
    build_pixel_cache(TensorDataset(images, torch.tensor(labels)), labels, 8, tmp_path / "px", num_workers=0)
    (bar,) = bars
    assert (bar.total, bar.n, bar.drawn) == (70, 70, True)
    assert len(PixelCacheDataset(tmp_path / "px")) == 70


def test_bar_draws_on_a_terminal_on_rank_zero_unless_the_env_says_no(monkeypatch):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    assert progress_enabled(TTY()) and not progress_enabled(io.StringIO())
    assert not progress_bar(10, "x", file=TTY()).disable
    monkeypatch.setenv(PROGRESS_ENV, "0")
    assert not progress_enabled(TTY())
    monkeypatch.setenv(PROGRESS_ENV, "1")
    assert progress_enabled(io.StringIO())
    monkeypatch.setattr("ftforget.forgetting.collectives.dist_info", lambda: (1, 2))
    assert not progress_enabled(TTY())
    assert progress_bar(10, "x", file=TTY()).disable


# ----------------------------------------------------------------------------- the step progress bar
def test_step_bar_counts_global_steps_toward_max_steps(tmp_path, capsys):
    bar = StepProgressBar()
    trainer = quiet_trainer(tmp_path, max_steps=7, callbacks=[bar], enable_progress_bar=True)
    trainer.fit(FullFineTuning(num_classes=5, **TINY_ARGS), datamodule=RandomImages(n=24, batch_size=8))
    assert trainer.global_step == 7  # 3 batches an epoch: the bar goes on over epochs
    assert (bar.train_progress_bar.total, bar.train_progress_bar.n) == (7, 7)
    assert bar.get_metrics(trainer, trainer.lightning_module)["epoch"] == trainer.current_epoch
    out = capsys.readouterr().out
    assert "7/7" in out and "epoch=2" in out and "Epoch " not in out


def test_cli_default_bar_is_the_step_bar_unless_disabled_or_given(tmp_path):
    def bar_of(*extra: str):
        cli = run_lightning([*tiny_overrides(tmp_path), *extra], run=False)
        return cli.trainer.progress_bar_callback

    assert isinstance(bar_of("--trainer.enable_progress_bar", "true"), StepProgressBar)
    assert bar_of() is None  # enable_progress_bar false, as in the tiny overrides
    given = bar_of("--trainer.enable_progress_bar", "true", "--trainer.callbacks+=TQDMProgressBar")
    assert type(given) is TQDMProgressBar


# --------------------------------------------------------------------- CLI fit: checkpoints and noise
class RaiseAt(L.Callback):
    """Raises once ``step`` optimizer steps are done, as a crash in the middle of a run."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"crash at step {self.step}")


def test_crash_writes_an_interrupted_checkpoint_not_a_best_one(tmp_path):
    options = [*tiny_overrides(tmp_path, steps=8), "--trainer.val_check_interval", "2"]
    crash = ["--trainer.callbacks+=tests.test_progress.RaiseAt", "--trainer.callbacks.step", "3"]
    with pytest.raises(RuntimeError, match="crash at step 3"):
        main(["fit", "--config", str(ROOT / "configs/full.yaml"), *options, *crash])
    names = sorted(p.name for p in tmp_path.rglob("*.ckpt"))
    assert "interrupted-step3.ckpt" in names and "last.ckpt" in names
    assert [n for n in names if n.startswith("best-")] == [n for n in names if n.startswith("best-step2-")]
    assert len([n for n in names if n.startswith("best-")]) == 1
    state = torch.load(tmp_path.rglob("interrupted-step3.ckpt").__next__(), weights_only=False)
    assert state["global_step"] == 3


def test_cli_fit_logs_no_hp_metric_and_no_leafspec_warning(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(
            [
                "fit",
                "--config",
                str(ROOT / "configs/full.yaml"),
                *tiny_overrides(tmp_path),
                "--trainer.log_every_n_steps",
                "1",
            ]
        )
    assert not [w for w in caught if LEAFSPEC_WARNING in str(w.message)]
    # Lightning's event file; the other one is ftforget's summary (tests/test_tensorboard.py)
    (events,) = [
        p for p in tmp_path.rglob("events.out.tfevents.*") if not p.name.endswith(".ftforget-summary")
    ]
    assert b"hp_metric" not in events.read_bytes()
    (summary,) = events.parent.glob("events.out.tfevents.*.ftforget-summary")  # written by the fit
    assert b"_hparams_/session_start_info" in summary.read_bytes()
    assert b"train/loss" in events.read_bytes()  # the file is the run's


def test_noise_filters_drop_exactly_the_known_messages():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_known_noise()
        module = "lightning.pytorch.utilities._pytree"
        warnings.warn_explicit(f"{LEAFSPEC_WARNING}, use ...", FutureWarning, "_pytree.py", 21, module=module)
        warnings.warn_explicit("another deprecation", FutureWarning, "_pytree.py", 22, module=module)
        warnings.warn_explicit(f"{LEAFSPEC_WARNING}, use ...", FutureWarning, "mine.py", 1, module="mine")
    assert [str(w.message) for w in caught] == ["another deprecation", f"{LEAFSPEC_WARNING}, use ..."]

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    rank_zero = logging.getLogger(LIGHTNING_RANK_ZERO_LOGGER)
    rank_zero.addHandler(handler)
    try:
        rank_zero_info("💡 Tip: For seamless cloud logging and experiment tracking, try installing litlogger")
        rank_zero_info("forgetting @ step 0: ...")
    finally:
        rank_zero.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["forgetting @ step 0: ..."]


@pytest.mark.parametrize("rank", ["0", "1"])
def test_ftforget_info_lines_show_on_rank_zero_only(rank):
    code = (
        "import logging; from ftforget.logging_setup import setup_console; setup_console(); "
        "logging.getLogger('ftforget.data.imagenet').info('pixel cache: 5 / 10 images'); "
        "logging.getLogger('ftforget.x').warning('a warning')"
    )
    env = {**os.environ, "RANK": rank, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert ("pixel cache: 5 / 10 images" in proc.stderr) == (rank == "0")
    assert "WARNING: a warning" in proc.stderr


# ------------------------------------------------------------------------------ machine defaults
@pytest.mark.parametrize(("cores", "workers", "threads"), [(1, 0, 1), (2, 1, 1), (4, 3, 2), (32, 8, 16)])
def test_defaults_follow_the_cores(monkeypatch, cores, workers, threads):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 64)
    assert machine.available_cores() == cores
    assert machine.default_num_workers() == workers
    assert KNNConfig().num_workers == workers
    assert machine.default_threads("cpu") == threads
    if not torch.cuda.is_available():
        assert machine.default_threads("auto") == threads
    assert machine.default_threads("gpu") is None  # torch's own on a GPU


def test_data_module_and_pixel_cache_take_the_machine_default():
    default = machine.default_num_workers()
    # CIFAR-100 takes num_workers from the shared new-task base (its **kwargs): the default is the base's.
    assert inspect.signature(NewTaskDataModule).parameters["num_workers"].default == default
    assert CIFAR100DataModule(root="anywhere").num_workers == default
    assert inspect.signature(build_pixel_cache).parameters["num_workers"].default is None  # resolved inside


def test_threads_option_sets_torch_threads(tmp_path):
    before = torch.get_num_threads()
    try:
        run_lightning([*tiny_overrides(tmp_path), "--threads", "1"], run=False)
        assert torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="threads"):
            machine.configure_threads(0, "cpu")
    finally:
        torch.set_num_threads(before)
