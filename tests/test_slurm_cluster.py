"""The cluster path for real: a one-node SLURM cluster on 127.0.0.1 (:mod:`tests.slurm_cluster`) runs the
script ``ftforget sweep --slurm`` writes.

- The demo preset as an array, 2 seeds: every task COMPLETED, and its table equals a local sweep's, which
  equals ``ftforget demo``'s (new-task and probe columns; timings aside).
- A task requeued three times mid-fit (``scontrol requeue``; ``scancel --signal=USR1`` to its processes;
  ``scancel --batch --signal=USR1`` to its script, as before a time limit) resumes its own run each time
  and ends bit-identical to an uninterrupted fit.
- A task of 2 CPU processes (gloo) under ``srun``: world size 2, the probe's measurements of one process,
  and the test accuracy of one process (each test image scored once).

Slow (about 5 minutes on 2 cores); skipped, naming what is missing, where SLURM is not installed
(``bash tests/system_packages.sh`` installs it).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ftforget.commands import main
from ftforget.report import read_csv
from ftforget.sweep import DEMO_METHODS
from tests.slurm_cluster import LocalCluster, local_cluster, missing_programs

MISSING = missing_programs()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(MISSING),
        reason=f"no local SLURM cluster: missing {', '.join(MISSING)} "
        "(bash tests/system_packages.sh installs slurm-wlm and munge)",
    ),  # fmt: skip
]

STEPS, PRETRAIN_STEPS = "30", "100"
#: a directory name that no unquoted shell word or #SBATCH path survives
AWKWARD = "sweep dir 'q' $x"
#: columns that are timings (they differ between any two sweeps) or where the runs are
TIMING = ("run", "probe_share", "probe_share_std")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with local_cluster(tmp_path_factory.mktemp("slurm")) as running:
        yield running


def sweep_args(out: Path, seeds: list[str], steps: str = STEPS) -> list[str]:
    return ["sweep", "--preset", "demo", "--seeds", *seeds, "--steps", steps, "--pretrain-steps", PRETRAIN_STEPS,
            "--output", str(out)]  # fmt: skip


def write_script(cluster: LocalCluster, args: list[str], script: Path, *options: str) -> None:
    split = args.index("--") if "--" in args else len(args)  # the sweep's own options before the fits'
    own = [*args[:split], "--slurm", str(script), "--gpus", "0", *options, *args[split:]]
    proc = subprocess.run(
        [sys.executable, "-m", "ftforget", *own],
        env=cluster.env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def submit(cluster: LocalCluster, script: Path, *options: str) -> str:
    return cluster.run("sbatch", "--parsable", *options, str(script)).stdout.strip()


def table(csv: Path) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in read_csv(csv)]


def say(capsys: pytest.CaptureFixture[str], line: str) -> None:
    with capsys.disabled():  # into the CI log, not only on failure
        sys.stdout.write(f"\n[slurm] {line}\n")


def test_demo_array_equals_local_sweep_and_demo(
    cluster: LocalCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    start = time.monotonic()
    out = tmp_path / AWKWARD / "array"
    script = tmp_path / AWKWARD / "demo.sbatch"
    write_script(cluster, sweep_args(out, ["0", "1"]), script)
    job = submit(cluster, script)
    # While the array runs: the same sweep here, and ftforget demo (their own pretraining, the same settings).
    assert main(sweep_args(tmp_path / "local", ["0", "1"])) == 0
    demo = ["demo", "--output", str(tmp_path / "demo"), "--steps", STEPS, "--pretrain-steps", PRETRAIN_STEPS]
    assert main(demo) == 0
    states = cluster.wait(job, timeout=1200)
    say(capsys, f"array job {job}: {json.dumps(states, sort_keys=True)} ({time.monotonic() - start:.0f} s)")
    assert sorted(states) == sorted(f"{job}_{i}" for i in range(2 * len(DEMO_METHODS)))
    assert set(states.values()) == {"COMPLETED"}
    # Each task pretrained or reused the one backbone, ran its run, and logged under the run's name.
    logs = out / "logs"
    assert sorted(p.name for p in logs.glob("*.log")) == sorted(
        f"{m}-seed{s}.log" for m in DEMO_METHODS for s in (0, 1)
    )
    assert len(list((out / "pretrained").glob("*.pth"))) == 1
    pretrained = [p for p in logs.glob("*.log") if "pretraining the backbone" in p.read_text()]
    assert len(pretrained) == 1  # built once, the other tasks waited for it and reused it

    # The report of the array: the same sweep again finds every run done and writes it.
    proc = subprocess.run([sys.executable, "-m", "ftforget", *sweep_args(out, ["0", "1"])], env=cluster.env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(": done") == 2 * len(DEMO_METHODS)
    array_table = table(out / "report" / "forgetting_table.csv")
    assert array_table == table(tmp_path / "local" / "report" / "forgetting_table.csv")
    assert len(array_table) == len(DEMO_METHODS) and {r["n"] for r in array_table} == {"2"}
    assert "Warning" not in proc.stdout  # one base for every seed
    # ftforget demo is the sweep's seed 0.
    seed0 = [str(tmp_path / "local" / m / "seed0") for m in DEMO_METHODS]
    assert main(["report", *seed0, "--output", str(tmp_path / "seed0")]) == 0
    assert table(tmp_path / "seed0" / "forgetting_table.csv") == table(
        tmp_path / "demo" / "report" / "forgetting_table.csv"
    )
    say(capsys, f"demo preset array + local sweep + demo, compared: {time.monotonic() - start:.0f} s")


def _steps(run: Path) -> list[int]:
    path = run / "forgetting.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []


def _job_field(cluster: LocalCluster, task: str, name: str) -> str:
    info = cluster.run("scontrol", "show", "job", "--oneliner", task).stdout
    match = re.search(rf"\b{name}=(\S+)", info)
    assert match, info
    return match.group(1)


def _running_past(cluster: LocalCluster, task: str, run: Path, step: int, restarts: int) -> None:
    """Waits until the task's ``restarts``-th start is running and its run has measured ``step``."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        state = _job_field(cluster, task, "JobState")
        assert state not in ("COMPLETED", "FAILED", "CANCELLED"), f"{task} is {state} before step {step}"
        if state == "PENDING" and int(_job_field(cluster, task, "Restarts")) == restarts:
            # A requeued job waits two minutes before it may start again; a test need not.
            cluster.run("scontrol", "update", f"JobId={task}", "StartTime=now", check=False)
        elif state == "RUNNING" and int(_job_field(cluster, task, "Restarts")) == restarts:
            if max(_steps(run), default=-1) >= step:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{task}: start {restarts} did not reach step {step}")


def test_a_task_requeued_mid_fit_resumes_its_run_bit_identically(
    cluster: LocalCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    start = time.monotonic()
    out = tmp_path / "requeued"
    # eval steps 0, 1, 2, 5, 10, 20, 50, 100, 200, 300; a periodic last.ckpt, so that every restart has one to
    # resume from even where a SIGTERM falls at an epoch's end (the fit then keeps the last periodic one)
    periodic = ["--", "--checkpoint.every_n_train_steps", "5"]
    args = [*sweep_args(out, ["0"], steps="300"), *periodic]
    script = tmp_path / "requeue.sbatch"
    write_script(cluster, args, script)
    job = submit(cluster, script, "--array=0")  # full fine-tuning, seed 0
    task, run = f"{job}_0", out / "full" / "seed0"
    _running_past(cluster, task, run, 20, restarts=0)
    cluster.run("scontrol", "requeue", task)  # a preemption, or an admin
    _running_past(cluster, task, run, 100, restarts=1)
    cluster.run("scancel", "--signal=USR1", task)  # to the task's processes: ftforget requeues itself
    _running_past(cluster, task, run, 200, restarts=2)
    cluster.run("scancel", "--batch", "--signal=USR1", task)  # to the script, as 90 s before the time limit
    _running_past(cluster, task, run, 0, restarts=3)
    states = cluster.wait(job, timeout=600)
    say(capsys, f"requeued job {job}: {states}, restarts {_job_field(cluster, task, 'Restarts')} "
                f"({time.monotonic() - start:.0f} s)")  # fmt: skip
    assert states == {task: "COMPLETED"}

    reference = tmp_path / "uninterrupted"
    assert main([*sweep_args(reference, ["0"], steps="300"), "--task", "0", *periodic]) == 0
    resumed_ckpt, whole_ckpt = (r / "full" / "seed0" / "checkpoints" / "last.ckpt" for r in (out, reference))
    resumed, whole = (torch.load(p, weights_only=True) for p in (resumed_ckpt, whole_ckpt))
    assert resumed["global_step"] == whole["global_step"] == 300
    assert resumed["state_dict"].keys() == whole["state_dict"].keys()
    for key, value in whole["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    # Each run once, nothing lost: one run directory, every measurement and the test exactly once.
    assert sorted(p.name for p in out.iterdir()) == ["full", "logs", "pretrained"]
    assert list((out / "full").iterdir()) == [run]
    assert _steps(run) == [0, 1, 2, 5, 10, 20, 50, 100, 200, 300]
    line = lambda r: (r["step"], r["top1"], r["top5"], r["new_task_val_acc1"])  # noqa: E731
    read = lambda r: [line(json.loads(x)) for x in (r / "forgetting.jsonl").read_text().splitlines()]  # noqa: E731
    assert read(run) == read(reference / "full" / "seed0")
    tests = [json.loads(x) for x in (run / "test_results.jsonl").read_text().splitlines()]
    assert len(tests) == 1 and tests[0]["step"] == 300
    log = (out / "logs" / "full-seed0.log").read_text()
    assert log.count("full seed 0: partial") == 3  # the three restarts resumed the run, none started it anew
    assert "SIGUSR1: requeueing job" in log


def test_a_two_process_task_measures_what_one_process_does(
    cluster: LocalCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    start = time.monotonic()
    two, one = tmp_path / "two", tmp_path / "one"
    script = tmp_path / "ddp.sbatch"
    write_script(cluster, sweep_args(two, ["0"]), script, "--devices", "2")
    task_index = DEMO_METHODS.index("linear")  # the frozen backbone: the probe is the same at every step
    job = submit(cluster, script, f"--array={task_index}")
    assert main([*sweep_args(one, ["0"]), "--task", str(task_index)]) == 0
    states = cluster.wait(job, timeout=600)
    say(capsys, f"2-process job {job}: {states} ({time.monotonic() - start:.0f} s)")
    assert set(states.values()) == {"COMPLETED"}
    log = (two / "logs" / "linear-seed0.log").read_text()
    assert "Starting with 2 processes" in log and "MEMBER: 2/2" in log  # Lightning read world size 2
    run_two, run_one = two / "linear" / "seed0", one / "linear" / "seed0"
    assert sorted(p.name for p in run_two.glob("*.jsonl")) == ["forgetting.jsonl", "test_results.jsonl"]
    fields = ("step", "k", "top1", "top5", "num_queries", "num_bank")
    measured = [
        [tuple(json.loads(x)[f] for f in fields) for x in (r / "forgetting.jsonl").read_text().splitlines()]
        for r in (run_two, run_one)
    ]
    assert measured[0] == measured[1] and len(measured[0]) == len(_steps(run_one))
    # The 2-process test scored each of the 179 test images once: its accuracy is one process's, exactly.
    assert main(["test", "--run", str(run_two), "--ckpt_path", "last", "--trainer.devices", "1"]) == 0
    ddp, single = [json.loads(x) for x in (run_two / "test_results.jsonl").read_text().splitlines()]
    assert ddp["test/acc1"] == single["test/acc1"] and ddp["test/acc5"] == single["test/acc5"]
    assert ddp["test/loss"] == pytest.approx(single["test/loss"], rel=1e-6)  # sums in another order
