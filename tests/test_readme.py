"""The README's commands, run as written on the digits miniature: the paper's configs with the miniature's
data, backbone and step count appended, paths under a temporary ``runs/``."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from ftforget.commands import main
from ftforget.report import read_csv

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DEMO = ROOT / "configs" / "demo"
#: commands the miniature cannot run here, and why
NOT_HERE = {"--trainer.devices 4": "four GPUs", "tensorboard": "a server"}


def section(title: str) -> str:
    start = README.index(f"## {title}")
    end = README.find("\n## ", start + 1)
    return README[start : end if end > 0 else None]


def commands(text: str) -> list[list[str]]:
    """``ftforget`` command lines of the fenced bash blocks in ``text``, comments dropped, continuations joined."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("ftforget "):
                found.append(shlex.split(line, comments=True)[1:])
    return found


def in_tmp(args: list[str], tmp: Path) -> list[str]:
    """Repository paths made absolute, ``runs/`` moved under ``tmp``."""
    out = []
    for arg in args:
        if arg.startswith("configs/"):
            arg = str(ROOT / arg)
        elif arg.startswith("runs"):
            arg = str(tmp / arg)
        out.append(arg)
    return out


@pytest.mark.slow
def test_running_the_experiments_as_written(tmp_path: Path, backbone: Path, capsys) -> None:
    miniature = [
        "--config", str(DEMO / "common.yaml"), "--model.init_args.checkpoint", str(backbone),
        "--trainer.max_steps", "16", "--trainer.check_val_every_n_epoch", "1",
        "--trainer.callbacks.eval_at_steps=[0, 5, 10, 16]", "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
    ]  # fmt: skip
    ran = []
    for args in commands(section("Running the experiments")):
        if any(marker in shlex.join(args) for marker in NOT_HERE):
            continue
        argv = in_tmp(args, tmp_path)
        fresh_fit = argv[0] == "fit" and "--config" in argv and "configs" in argv[argv.index("--config") + 1]
        if fresh_fit:
            argv += miniature
        if "--print_config" in argv:
            argv.remove("--print_config")
            argv.append("--print_config")  # after the miniature's options, so that it prints them
            with pytest.raises(SystemExit) as exit_info:
                main(argv)
            assert exit_info.value.code == 0
        else:
            assert main(argv) == 0, shlex.join(argv)
        ran.append(args[0])
        assert "Traceback" not in capsys.readouterr().err
    assert ran == ["fit", "fit", "fit", "test", "test", "report", "fit"]
    runs = tmp_path / "runs" / "lora_r8"
    assert sorted(p.name for p in runs.iterdir()) == ["version_0", "version_1"]  # the run, and its re-run
    report = read_csv(tmp_path / "runs" / "report" / "forgetting_table.csv")
    (row,) = [r for r in report if str(runs / "version_0") in r["run"]]
    assert row["method"].startswith("LoRA r=8") and row["new_task_test_acc1"] not in ("", "None")
    assert (tmp_path / "runs" / "report" / "report.html").is_file()  # --html


def test_reproducing_the_table_commands_parse(tmp_path: Path, capsys) -> None:
    sweeps = [c for c in commands(section("Reproducing the paper's table")) if c[0] == "sweep"]
    assert len(sweeps) == 3
    for args in sweeps:
        argv = in_tmp(args, tmp_path)
        if "--slurm" in argv:
            argv[argv.index("--slurm") + 1] = str(tmp_path / "paper.sbatch")
            assert main(argv) == 0
            assert subprocess.run(["bash", "-n", str(tmp_path / "paper.sbatch")]).returncode == 0
            assert "#SBATCH --array=0-29" in (tmp_path / "paper.sbatch").read_text()
            continue
        if "--dry-run" not in argv:  # the real sweep needs CIFAR-100 and ImageNet: plan it
            argv.insert(argv.index("--"), "--dry-run")
        capsys.readouterr()
        assert main(argv) == 0
        assert len(capsys.readouterr().out.splitlines()) == 10 * 3 * 2


@pytest.mark.slow
def test_controlling_forgetting_as_written(tmp_path: Path, backbone: Path, capsys) -> None:
    """The section's fits (the paper's configs, with the miniature appended), knobs, sweep plan and report."""
    miniature = [
        "--config", str(DEMO / "common.yaml"), "--model.init_args.checkpoint", str(backbone),
        "--trainer.max_steps", "8", "--trainer.check_val_every_n_epoch", "1",
        "--trainer.callbacks.eval_at_steps=[0, 8]", "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
    ]  # fmt: skip
    ran = []
    for args in commands(section("Controlling forgetting")):
        argv = in_tmp(args, tmp_path)
        if argv[0] == "fit":
            # The paper's config first, then the miniature, then the section's own options (they win).
            split = argv.index("--config") + 2
            argv = [*argv[:split], *miniature, *argv[split:]]
        if argv[0] == "sweep":
            argv.insert(argv.index("--output"), "--dry-run")  # the real sweep needs CIFAR-100 and ImageNet
        assert main(argv) == 0, shlex.join(argv)
        ran.append(args[0])
        assert "Traceback" not in capsys.readouterr().err
    assert ran == ["fit", "knob", "knob", "fit", "fit", "fit", "fit", "fit", "sweep", "report"]
    runs = tmp_path / "runs"
    labels = {row["method"] for row in read_csv(runs / "report" / "forgetting_table.csv")}
    assert {"full fine-tuning + L2-SP 0.01", "LoRA r=8 + distill 0.1", "full fine-tuning + LP-FT head",
            "full fine-tuning + LP-FT 1000 steps", "linear probe"} <= labels  # fmt: skip
    knob = read_csv(runs / "report" / "knob_points.csv")
    assert sorted({float(r["alpha"]) for r in knob}) == [0.0, 0.5, 0.9, 1.0]
    assert (runs / "report" / "stability_plasticity.png").is_file()


def test_on_a_slurm_cluster_commands_write_the_scripts_they_describe(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """The section's ``ftforget sweep --slurm`` lines write the scripts its table describes (the real cluster
    runs them in tests/test_slurm_cluster.py); ``sbatch``, ``squeue`` and ``tail`` are SLURM's and the shell's."""
    monkeypatch.chdir(tmp_path)
    sweeps = [c for c in commands(section("On a SLURM cluster")) if c[0] == "sweep"]
    assert [c[c.index("--slurm") + 1] for c in sweeps] == ["paper.sbatch", "demo.sbatch"]
    for args in sweeps:
        assert main(in_tmp(args, tmp_path)) == 0, shlex.join(args)
        assert "Traceback" not in capsys.readouterr().err
    paper = (tmp_path / "paper.sbatch").read_text().splitlines()
    for line in ("#SBATCH --array=0-29", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=64G", "#SBATCH --time=24:00:00",
                 "#SBATCH --partition=gpu", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@90",
                 "#SBATCH --open-mode=append", "source .venv/bin/activate"):  # fmt: skip
        assert line in paper, line
    demo = (tmp_path / "demo.sbatch").read_text()
    assert (
        "#SBATCH --array=0-11\n#SBATCH --nodes=1\n#SBATCH --ntasks-per-node=2\n#SBATCH --time=1:00:00\n"
        in demo
    )
    assert "gpus" not in demo and "-- --trainer.devices 2 --trainer.accelerator cpu &" in demo
    for script in ("paper.sbatch", "demo.sbatch"):
        assert subprocess.run(["bash", "-n", str(tmp_path / script)]).returncode == 0
    # the per-run log the section tails, and the directory SLURM writes its own logs into
    assert f"  12) log={tmp_path}/runs/paper/logs/lora-seed0.log ;;" in paper  # the 5th row, seed 0
    assert (tmp_path / "runs" / "paper" / "logs").is_dir()
