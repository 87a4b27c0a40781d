"""What a user sees: TensorBoard over a short demo's runs, and the report's HTML page, in a real headless
Chromium (Debian's ``chromium``; ``tests/system_packages.sh`` installs it).

TensorBoard listens on 127.0.0.1 only, on a free port, and is stopped at the end; the browser resolves no
other host. The values are checked on TensorBoard's own JSON data endpoints (what its pages draw) against
the report's CSV; the pages are loaded and photographed (into the test's tmp dir, and into
``$FTFORGET_SCREENSHOTS`` when set: ``FTFORGET_SCREENSHOTS=docs python -m pytest
tests/test_tensorboard_browser.py`` with ``FTFORGET_BROWSER_DEMO`` naming a full demo's output
refreshes the README's screenshots).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ftforget.commands import main as ftforget_main
from ftforget.report import read_csv
from ftforget.report.html import table_cells
from ftforget.report.tensorboard import FINAL_METRICS, trial_id
from tests.browser import Chromium, chromium_program

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        chromium_program() is None,
        reason="needs Debian's chromium (run tests/system_packages.sh as root to install it)",
    ),
]

HOST = "127.0.0.1"
STEPS = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short demo (full fine-tuning and LoRA, fitted, tested, knob measured) and its HTML report; or the
    demo output directory ``$FTFORGET_BROWSER_DEMO`` (e.g. a full ``ftforget demo``, for the README's
    screenshots), whose report is rewritten with its page."""
    given = os.environ.get("FTFORGET_BROWSER_DEMO")
    if given:
        out = Path(given)
    else:
        out = tmp_path_factory.mktemp("tb") / "demo"
        argv = [
            "--output",
            str(out),
            "--steps",
            str(STEPS),
            "--pretrain-steps",
            "50",
            "--methods",
            "full,lora",
        ]
        assert ftforget_main(["demo", *argv]) == 0
    assert ftforget_main(["report", str(out), "--output", str(out / "report"), "--html"]) == 0
    return out


def run_names(demo: Path) -> list[str]:
    """The TensorBoard run names of the demo's runs (``full/seed0``, ...), as in the report's CSV."""
    rows = read_csv(demo / "report" / "forgetting_table.csv")
    return sorted(f"{Path(r['run']).parent.name}/{Path(r['run']).name}" for r in rows)


def get(base: str, path: str, body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=20) as answer:
        return json.loads(answer.read())


@pytest.fixture(scope="module")
def tensorboard(demo: Path) -> Iterator[str]:
    """TensorBoard over the demo on 127.0.0.1 (its URL), once it serves every run; stopped afterwards."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(demo), "--host", HOST, "--port", str(port),
         "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://{HOST}:{port}"
    runs = {*run_names(demo), "report"}
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if runs <= set(get(base, "/data/runs")) and len(hparams_groups(base)) == len(runs) - 1:
                    break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"TensorBoard did not serve {sorted(runs)} within 90 s (exit {process.poll()})"
                )
            time.sleep(0.5)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


def hparams_groups(base: str) -> list[dict[str, Any]]:
    request = {
        "experimentName": "",
        "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
        "colParams": [],
        "startIndex": 0,
        "sliceSize": 100,
    }
    return get(base, "/data/plugin/hparams/session_groups", request).get("sessionGroups", [])


def f32(text: str) -> float:
    return float(np.float32(float(text)))


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    chromium = Chromium(tmp_path_factory.mktemp("profile"), size=(1500, 950))
    try:
        yield chromium
    finally:
        chromium.close()


def keep(shot: Path) -> None:
    """Copies a screenshot to ``$FTFORGET_SCREENSHOTS`` (e.g. ``docs``) when that is set."""
    target = os.environ.get("FTFORGET_SCREENSHOTS")
    if target:
        shutil.copyfile(shot, Path(target) / shot.name)


def local_only(urls: list[str], scheme: str) -> list[str]:
    """The URLs that go anywhere else than ``scheme`` (the page's own: http://127.0.0.1 or file://)."""
    return [u for u in urls if not u.startswith((scheme, "data:", "blob:", "about:"))]


def test_hparams_served_equal_the_report_table(demo: Path, tensorboard: str) -> None:
    rows = {Path(r["run"]): r for r in read_csv(demo / "report" / "forgetting_table.csv")}
    groups = {g["sessions"][0]["name"]: g for g in hparams_groups(tensorboard)}
    assert sorted(groups) == run_names(demo)
    for run_dir, row in rows.items():
        name = f"{run_dir.parent.name}/{run_dir.name}"
        group = groups[name]
        assert group["name"] == trial_id(run_dir)
        hparams = {key.split(" ", 1)[1]: value for key, value in group["hparams"].items()}
        assert hparams["method"] == row["method"]
        assert hparams["trainable_params"] == float(row["trainable_params"])
        served = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
        expected = {tag: f32(row[col]) for tag, col in FINAL_METRICS.items() if col in row and row[col] != ""}
        assert {tag: served[tag] for tag in expected} == expected  # float32, exactly
        assert len(expected) >= 6  # test, probe end, drops, AUC, probe share at least
        # the new-task val top-1: the run's last one, as TensorBoard serves that series
        series = get(tensorboard, f"/data/plugin/scalars/scalars?run={name}&tag=forgetting/new_task_val_acc1")
        assert served["final/new_task_val_acc1"] == series[-1][2] and series[-1][1] == int(row["end_step"])


def chart_tags(base: str, run: str, patterns: list[str]) -> set[str]:
    """The tags a custom-scalars chart draws for ``run``: what TensorBoard serves for its regexes."""
    found: set[str] = set()
    for pattern in patterns:
        query = urllib.parse.urlencode({"run": run, "tag": pattern})
        served = get(base, f"/data/plugin/custom_scalars/scalars?{query}")
        assert served["regex_valid"], pattern
        found |= set(served["tag_to_events"])
    return found


def test_custom_scalars_layout_names_every_runs_tags(demo: Path, tensorboard: str) -> None:
    layout = get(tensorboard, "/data/plugin/custom_scalars/layout")
    charts = {c["title"]: c["multiline"]["tag"] for cat in layout["category"] for c in cat["chart"]}
    assert list(charts) == [
        "probe k-NN top-1 (old task) and new-task val top-1",
        "loss terms",
        "learning rate",
    ]
    tags = get(tensorboard, "/data/plugin/scalars/tags")
    for run in run_names(demo):
        drawn = chart_tags(tensorboard, run, charts["probe k-NN top-1 (old task) and new-task val top-1"])
        assert {"forgetting/knn_top1", "forgetting/new_task_val_acc1"} <= drawn <= set(tags[run])
        assert drawn == {"forgetting/knn_top1", "forgetting/new_task_val_acc1", "val/acc1"} & set(tags[run])
        assert chart_tags(tensorboard, run, charts["loss terms"]) == {
            t for t in tags[run] if t.startswith("train/loss")
        }
        assert (
            chart_tags(tensorboard, run, charts["learning rate"])
            == {t for t in tags[run] if t.startswith("lr-")}
            != set()
        )


#: every checkbox of the page, through the shadow roots of TensorBoard's Polymer elements
CHECKBOXES = """(function all(root, out) {
  root.querySelectorAll("*").forEach(e => { out.push(e); if (e.shadowRoot) { all(e.shadowRoot, out); } });
  return out;
})(document, []).filter(e => e.tagName === "PAPER-CHECKBOX")"""


def test_tensorboard_pages_load_in_chromium(
    demo: Path, tensorboard: str, browser: Chromium, tmp_path: Path
) -> None:
    for page in ("scalars", "custom_scalars", "text", "images", "hparams"):
        if page == "hparams":
            browser.resize(1920, 640)
        browser.open(f"{tensorboard}/#{page}")
        browser.wait_idle()
        if page == "hparams":  # room for the headline numbers: two settings columns off, as a user would
            assert browser.evaluate(CHECKBOXES + ".filter(b => b.checked).map(b => b.textContent.trim())")[:7] == [
                "method", "lr", "trainable_params", "method_args", "seed", "new_task_test_acc1", "probe_acc_end"
            ]  # fmt: skip
            browser.evaluate(CHECKBOXES + ".filter(b => ['method_args', 'seed'].includes(b.textContent.trim()))"
                             ".forEach(b => b.click())")  # fmt: skip
            browser.wait_idle(quiet=1.0)
        assert browser.evaluate("document.title") == "TensorBoard"
        assert local_only(browser.requests(), tensorboard) == [], page
        assert browser.failed_requests() == [], page
        shot = browser.screenshot(tmp_path / f"tensorboard_{page}.png")
        assert shot.stat().st_size > 20_000  # a drawn page, not a blank one
        keep(shot)
    browser.resize(1500, 950)
    # the HParams tab asked the server for the runs' groups
    assert any("/data/plugin/hparams/session_groups" in url for url in browser.requests())


def test_html_report_opens_offline_and_shows_the_markdown_table(
    demo: Path, browser: Chromium, tmp_path: Path
) -> None:
    page = (demo / "report" / "report.html").as_uri()
    browser.open(page)
    browser.wait_idle(quiet=0.5)
    assert local_only(browser.requests(), page) == []
    assert browser.failed_requests() == []
    cells = browser.evaluate(
        "Array.from(document.querySelector('table').rows).map(r => Array.from(r.cells).map(c => c.textContent))"
    )
    markdown = (demo / "report" / "forgetting_table.md").read_text().split("\n\n", 1)[0].splitlines()
    assert cells == [table_cells(markdown[0]), *(table_cells(line) for line in markdown[2:])]
    assert browser.evaluate("document.querySelectorAll('figure img').length") == 2
    assert browser.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    keep(browser.screenshot(tmp_path / "report_html.png"))  # what a laptop screen shows first
    assert browser.screenshot(tmp_path / "report_html_full.png", full_page=True).stat().st_size > 50_000
    # A click on a header sorts the rows by that column; a second click reverses them.
    column = table_cells(markdown[0]).index("new-task test acc")
    order = "Array.from(document.querySelector('table').tBodies[0].rows).map(r => r.cells[{}].textContent)"
    browser.evaluate(f"document.querySelector('table').tHead.rows[0].cells[{column}].click()")
    ascending = browser.evaluate(order.format(column))
    assert ascending == sorted(ascending, key=float) and len(ascending) == len(run_names(demo))
    browser.evaluate(f"document.querySelector('table').tHead.rows[0].cells[{column}].click()")
    assert browser.evaluate(order.format(column)) == ascending[::-1]
