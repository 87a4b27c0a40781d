"""notebooks/forgetting_curves.ipynb runs headless against a small run directory and draws its figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.loggers import TensorBoardLogger

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "forgetting_curves.ipynb"
CURVES = {
    "full": {0: 0.95, 1: 0.95, 10: 0.6, 100: 0.7},
    "linear": {0: 0.95, 1: 0.95, 10: 0.95, 100: 0.95},
}
CLASSES = {"full": "ftforget.methods.FullFineTuning", "linear": "ftforget.methods.LinearProbing"}


def write_run(root: Path, name: str) -> Path:
    """A run as the forgetting callback and ``trainer.test`` leave it: events, jsonl and config."""
    logger = TensorBoardLogger(save_dir=str(root), name=name, default_hp_metric=False)
    run_dir = Path(logger.log_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": {"class_path": CLASSES[name]}}))
    curve = CURVES[name]
    for step, top1 in curve.items():
        logger.log_metrics({"forgetting/knn_top1": top1}, step=step)
    logger.log_metrics({"params/trainable": 1000.0, "test/acc1": 0.9}, step=100)
    logger.finalize("success")
    lines = [{"step": s, "k": 20, "probe": "digits-old", "top1": v} for s, v in curve.items()]
    (run_dir / "forgetting.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run_dir


def test_notebook_executes_and_draws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in CURVES:
        write_run(tmp_path / "runs", name)
    monkeypatch.setenv("FTFORGET_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # Run in tmp_path: nothing the notebook might write lands in the repository.
    client = nbclient.NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) == 2  # the forgetting curves and the stability-plasticity plane
    tables = [out["data"]["text/markdown"] for out in outputs if "text/markdown" in out.get("data", {})]
    assert len(tables) == 1
    assert "| full fine-tuning | 1,000 | 90.00 | 95.00 | 60.00 | 70.00 | 25.00 | 26.32 | 80.00 |" in tables[0]
    assert "| linear probe | 1,000 | 90.00 | 95.00 | 95.00 | 95.00 | 0.00 | 0.00 | 92.50 |" in tables[0]
    printed = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert f"2 run(s) under {tmp_path / 'runs'}, 2 with forgetting measurements" in printed
