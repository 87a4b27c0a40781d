"""A real one-node SLURM cluster on 127.0.0.1 for the tests: munged, slurmctld and slurmd as child processes.

Everything lives in one directory (configuration, munge key and socket, state, logs, spool); nothing of
the machine's own SLURM or munge setup is read or changed. Clients find the cluster through
``SLURM_CONF`` (see :meth:`LocalCluster.env`). Debian's ``slurm-wlm`` and ``munge`` packages provide
the programs (``bash tests/system_packages.sh`` installs them); :func:`missing_programs` names what a
test must skip for.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel")
#: a finished job stays visible to ``scontrol show job`` this long (there is no accounting database)
MIN_JOB_AGE_S = 3600


def missing_programs() -> list[str]:
    """The cluster's programs not on ``PATH`` (or ``/usr/sbin``); being root is needed too."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin"
    missing = [p for p in PROGRAMS if shutil.which(p, path=path) is None]
    if os.geteuid() != 0:
        missing.append("root (munged and slurmd run as root here)")
    return missing


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class LocalCluster:
    """The running cluster: its directory, node name and the environment its clients need."""

    def __init__(self, root: Path, node: str, conf: Path, munge_socket: Path) -> None:
        self.root, self.node, self.conf, self.munge_socket = root, node, conf, munge_socket

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: this process's environment) with ``SLURM_CONF`` set to this cluster and any
        SLURM job variables of an enclosing job removed."""
        env = {k: v for k, v in (base or os.environ).items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = env.get("PATH", "") + os.pathsep + "/usr/sbin"
        return env

    def run(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Runs a SLURM client command (``sbatch``, ``scontrol``, ...) against this cluster."""
        proc = subprocess.run(list(argv), env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def job_states(self, job_id: str) -> dict[str, str]:
        """``<job id>[_<array index>] -> JobState`` of a job (every task of an array)."""
        out = self.run("scontrol", "show", "job", "--oneliner", job_id).stdout
        states = {}
        for line in out.splitlines():
            fields = dict(re.findall(r"(\w+)=(\S*)", line))
            name = fields["JobId"]
            if fields.get("ArrayTaskId"):
                name = f"{fields['ArrayJobId']}_{fields['ArrayTaskId']}"
            states[name] = fields["JobState"]
        return states

    def wait(self, job_id: str, timeout: float, done=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
             "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED")) -> dict[str, str]:  # fmt: skip
        """Waits until every task of ``job_id`` is in a final state; returns the states.

        Raises:
            TimeoutError: not all done within ``timeout`` seconds (the states so far in the message).
        """
        deadline = time.monotonic() + timeout
        while True:
            states = self.job_states(job_id)
            if states and all(s in done for s in states.values()) and "_[" not in "".join(states):
                return states
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not finished after {timeout:.0f} s: {states}")
            time.sleep(1)


def _slurm_conf(root: Path, node: str, ports: list[int], munge_socket: Path) -> str:
    cpus = os.cpu_count() or 1
    return "\n".join([
        "ClusterName=ftforget-test",
        f"SlurmctldHost={node}(127.0.0.1)",  # slurmctld checks that this is its own host name
        "MailProg=/bin/true",
        f"SlurmctldPort={ports[0]}",
        f"SlurmdPort={ports[1]}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket}",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'slurmd.log'}",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        "ProctrackType=proctrack/linuxproc",  # no cgroups in a test sandbox
        "TaskPlugin=task/none",
        "MpiDefault=none",
        "SwitchType=switch/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SchedulerType=sched/backfill",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "ReturnToService=2",
        "JobRequeue=1",
        f"MinJobAge={MIN_JOB_AGE_S}",
        "KillWait=10",  # SIGTERM to SIGKILL: a tiny fit saves its last.ckpt well within it
        "InactiveLimit=0",
        "SlurmctldTimeout=30",
        "SlurmdTimeout=30",
        "MessageTimeout=30",
        f"NodeName={node} NodeAddr=127.0.0.1 NodeHostname={socket.gethostname()} CPUs={cpus} "
        "RealMemory=4000 State=UNKNOWN",
        f"PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP",
        "",
    ])  # fmt: skip


def _cancel_all(env: dict[str, str], timeout: float = 60) -> None:
    """Cancels every job and waits (bounded) until none is left, so no job process outlives the test."""
    try:
        if subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True, timeout=10).returncode:
            return  # slurmctld is not answering: nothing was started through it
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(
                ["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True, timeout=10
            )
            if out.returncode != 0 or not out.stdout.strip():
                return
            time.sleep(0.5)
    except subprocess.TimeoutExpired:
        return


def _wait_for(check, what: str, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            tail = log.read_text()[-2000:] if log.is_file() else "(no log)"
            raise RuntimeError(f"local SLURM: {what} not ready after {timeout:.0f} s; log {log}:\n{tail}")
        time.sleep(0.2)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@contextmanager
def local_cluster(root: Path) -> Iterator[LocalCluster]:
    """Starts munged, slurmctld and slurmd under ``root`` (which must exist and be empty enough), yields the
    cluster once its node is idle, and stops all three (and cancels every job left) on the way out."""
    root = Path(root).resolve()
    for sub in ("state", "spool", "munge"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "munge", 0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    munge_socket = root / "munge" / "munge.socket"
    node = socket.gethostname().split(".")[0]  # resolvable here: DDP's rendezvous address is the node's name
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, node, _free_ports(2), munge_socket))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["SLURM_CONF"] = str(conf)
    procs: list[subprocess.Popen] = []
    cluster = LocalCluster(root, node, conf, munge_socket)
    try:
        munge_log = root / "munge" / "munged.log"
        procs.append(subprocess.Popen(
            ["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={munge_socket}",
             f"--pid-file={root / 'munge' / 'munged.pid'}", f"--log-file={munge_log}",
             f"--seed-file={root / 'munge' / 'munged.seed'}"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        ))  # fmt: skip
        _wait_for(munge_socket.exists, "munged", munge_log)
        procs.append(subprocess.Popen(
            ["slurmctld", "-D", "-i", "-f", str(conf)], env=env,
            stdout=open(root / "slurmctld.out", "w"), stderr=subprocess.STDOUT,
        ))  # fmt: skip
        procs.append(subprocess.Popen(
            ["slurmd", "-D", "-N", node, "-f", str(conf)], env=env,
            stdout=open(root / "slurmd.out", "w"), stderr=subprocess.STDOUT,
        ))  # fmt: skip

        def node_idle() -> bool:
            for proc in procs:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"local SLURM: {proc.args[0]} exited with {proc.returncode}; see {root}"
                    )
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True)
            return out.returncode == 0 and out.stdout.strip().rstrip("*") == "idle"

        _wait_for(node_idle, "the node", root / "slurmctld.log", timeout=60)
        yield cluster
    finally:
        _cancel_all(env)
        for proc in reversed(procs):
            _stop(proc)
