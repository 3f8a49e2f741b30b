"""A private, real single-node SLURM cluster for tests (the ``slurm_cluster`` session fixture).

The fixture starts ``munged``, ``slurmctld`` and ``slurmd`` as root from a generated ``slurm.conf``
whose key, sockets, ports, state, spool, pid and log files all live in one temporary folder, so it
neither reads nor disturbs the machine's own ``/etc/munge`` or ``/etc/slurm`` state and two test
sessions on one machine do not meet. The node is named after ``hostname -s`` and has the machine's
cores; processes are tracked without cgroups (``proctrack/linuxproc``, ``task/none``) and there is no
accounting database (``sacct`` does not work: a study must not depend on it). Teardown cancels every
job, then stops exactly the daemons it started. Tests skip, with the reason, when the SLURM or MUNGE
programs are absent or the session is not root (``.ci/run`` installs Debian's ``slurm-wlm`` and
``munge``); a daemon that fails to start fails the tests with the last lines of its log.

Client commands see the cluster through ``SLURM_CONF``: pass ``cluster.env`` to a subprocess, or
``monkeypatch.setenv("SLURM_CONF", str(cluster.conf))`` for code that runs ``sbatch`` in-process.
(Importable because pyproject.toml puts tests/ on pytest's path; tests/conftest.py registers it.)
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PARTITION = "debug"
# Seconds between a job's SIGTERM and its SIGKILL (on scancel, requeue and time limit).
KILL_WAIT_S = 5
# A requeued job may not start again before its step credential expires (Slurm's default: 120 s);
# 5 s keeps requeue tests short while leaving a step ample time to start on an idle node.
CRED_EXPIRE_S = 5
# The states of a job that will not run again (unless requeued by hand).
ENDED_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                          "BOOT_FAIL", "DEADLINE"})
_STARTUP_TIMEOUT_S = 60
_LOG_TAIL_LINES = 25
_REQUIRED_PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
# Variables through which a surrounding SLURM job (or a user's defaults) would steer client commands.
_CLIENT_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "SQUEUE_", "SINFO_", "SCANCEL_", "SCONTROL_")
_JOB_FIELD = re.compile(r"(?:^|\s)([A-Za-z][\w:/]*)=(\S*)")


def wait_until(condition, timeout: float, describe, interval: float = 0.2):
    """Poll ``condition()`` until it returns a true value (returned); fail with ``describe()`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {describe()}")
        time.sleep(interval)


def log_tail(*paths: Path, lines: int = _LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of each existing file, headed by its name (for failure messages)."""
    parts = []
    for path in paths:
        if path.exists():
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name} (last {len(text)} lines)\n" + "\n".join(text))
    return "\n".join(parts) or "(no log written)"


@dataclass
class _Daemon:
    name: str
    process: subprocess.Popen
    logs: tuple

    def failure(self, what: str) -> str:
        return f"{self.name} {what}\n{log_tail(*self.logs)}"


@dataclass
class SlurmCluster:
    """A running cluster: ``env`` for subprocesses, ``conf`` (the slurm.conf), ``partition``, ``node``."""

    root: Path
    conf: Path
    node: str
    cpus: int
    env: dict
    partition: str = PARTITION
    daemons: list = field(default_factory=list)

    def run(self, *args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster; with ``check``, fail with its stderr."""
        result = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=60, **kwargs)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def sbatch(self, args=(), script: str | None = None) -> str:
        """Submit a job (``script``: a batch script's text, or None with ``--wrap`` in ``args``); its id."""
        command = ["sbatch", "--parsable", *args]
        if script is not None:
            handle, script_path = tempfile.mkstemp(prefix="job-", suffix=".sh", dir=self.root / "scripts")
            with os.fdopen(handle, "w") as out:
                out.write(script)
            command.append(script_path)
        return self.run(*command).stdout.strip().split(";")[0]

    def squeue(self) -> list:
        """The jobs slurmctld still knows as pending or running: dicts of id, state, reason, name."""
        out = self.run("squeue", "--noheader", "--format=%i|%T|%r|%j").stdout
        return [dict(zip(("id", "state", "reason", "name"), line.split("|", 3))) for line in out.splitlines()]

    def scontrol(self, *args: str) -> str:
        return self.run("scontrol", *args).stdout

    def job(self, job_id: str) -> dict:
        """``scontrol show job``'s fields (JobState, Reason, Restarts, NodeList, ...); finished jobs stay
        visible for MinJobAge (300 s)."""
        return dict(_JOB_FIELD.findall(self.scontrol("show", "job", "--oneliner", str(job_id))))

    def wait_for(self, job_id: str, states, timeout: float = 60) -> dict:
        """Wait until the job's JobState is one of ``states``; its fields. Fails with the job and logs."""
        wanted = {states} if isinstance(states, str) else set(states)
        last = {}

        def reached():
            last.update(self.job(job_id))
            return last.get("JobState") in wanted and dict(last)

        def describe():
            return (f"job {job_id} is {last.get('JobState')} (reason {last.get('Reason')}), "
                    f"not {sorted(wanted)}\n{self.logs()}")

        return wait_until(reached, timeout, describe)

    def logs(self) -> str:
        return log_tail(*(path for daemon in self.daemons for path in daemon.logs))


def _free_ports(count: int) -> list:
    """Ports free now (all held open together, so they differ)."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def _real_memory_mb() -> int:
    """Half the machine's memory: slurmd drains a node configured with more than it has."""
    with open("/proc/meminfo") as meminfo:
        total_kb = int(next(line for line in meminfo if line.startswith("MemTotal:")).split()[1])
    return max(total_kb // 2048, 256)


def _slurm_conf(root: Path, node: str, cpus: int, munge_socket: Path) -> str:
    controller_port, node_port = _free_ports(2)
    return "\n".join([
        "ClusterName=atmemtest",
        f"SlurmctldHost={node}",
        f"SlurmctldPort={controller_port}",
        f"SlurmdPort={node_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket},cred_expire={CRED_EXPIRE_S}",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'slurmd.log'}",
        # An empty plug-in stack: the machine's /etc/slurm/plugstack.conf.d stays out of the tests.
        f"PlugStackConfig={root / 'plugstack.conf'}",
        "MailProg=/bin/true",
        # No cgroups: the tests share a few cores with other work and may run in a container.
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/builtin",
        # The full queue is tested every second, not every 60 s: a requeued job starts soon after its
        # credential expires instead of a minute later.
        "SchedulerParameters=sched_interval=1",
        "ReturnToService=2",
        "JobRequeue=1",
        "MpiDefault=none",
        f"KillWait={KILL_WAIT_S}",
        "InactiveLimit=0",
        "MinJobAge=300",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "JobCompType=jobcomp/none",
        f"NodeName={node} CPUs={cpus} RealMemory={_real_memory_mb()} State=UNKNOWN",
        f"PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


def _start(name: str, command: list, root: Path, env: dict, logs: tuple) -> _Daemon:
    console = root / f"{name}.console"
    with open(console, "wb") as out:
        process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    return _Daemon(name, process, (*logs, console))


def _wait_ready(daemon: _Daemon, ready, what: str) -> None:
    """Wait until ``ready()``; fail with the daemon's log tail if it exits or takes too long."""
    deadline = time.monotonic() + _STARTUP_TIMEOUT_S
    while not ready():
        if daemon.process.poll() is not None:
            pytest.fail(daemon.failure(f"exited {daemon.process.returncode} before {what}"), pytrace=False)
        if time.monotonic() > deadline:
            pytest.fail(daemon.failure(f"not {what} within {_STARTUP_TIMEOUT_S} s"), pytrace=False)
        time.sleep(0.2)


def _stop(daemon: _Daemon) -> None:
    if daemon.process.poll() is None:
        daemon.process.send_signal(signal.SIGTERM)
        try:
            daemon.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            daemon.process.kill()
            daemon.process.wait()


def _node_state(cluster: SlurmCluster) -> str:
    result = cluster.run("sinfo", "--noheader", "--Node", f"--nodes={cluster.node}", "--format=%T", check=False)
    return result.stdout.strip()


def _cancel_all(cluster: SlurmCluster) -> None:
    """Cancel every job and wait for them to end, so that slurmd stops with no job steps left."""
    try:
        jobs = [job["id"] for job in cluster.squeue()]
        if jobs:
            cluster.run("scancel", *jobs, check=False)
            wait_until(lambda: not cluster.squeue(), KILL_WAIT_S + 20, lambda: f"jobs left: {cluster.squeue()}")
    except (AssertionError, subprocess.TimeoutExpired):
        pass  # slurmctld is down or a job outlived the wait: stopping the daemons below still ends them


def _skip_reason() -> str | None:
    missing = [name for name in _REQUIRED_PROGRAMS if shutil.which(name) is None]
    if missing:
        return (f"SLURM/MUNGE programs absent ({', '.join(missing)}): "
                "install Debian's slurm-wlm and munge packages (.ci/run does)")
    if os.geteuid() != 0:
        return "the private SLURM cluster runs its daemons as root (SlurmUser=root); this session is not root"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real single-node SLURM cluster, idle and accepting ``sbatch``; torn down after the session."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    # Not pytest's tmp_path: munged refuses a socket in a folder others cannot enter, and a Unix
    # socket's path must stay short.
    root = Path(tempfile.mkdtemp(prefix="at-mem-slurm-"))
    key = root / "munge.key"  # written while the folder is still private to root
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    root.chmod(0o755)
    for folder in ("state", "spool", "scripts"):
        (root / folder).mkdir()
    (root / "plugstack.conf").touch()
    munge_socket = root / "munge.socket"
    node = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, node, cpus, munge_socket))
    env = {name: value for name, value in os.environ.items() if not name.startswith(_CLIENT_ENV_PREFIXES)}
    env["SLURM_CONF"] = str(conf)
    cluster = SlurmCluster(root=root, conf=conf, node=node, cpus=cpus, env=env)
    try:
        munged = _start("munged", ["munged", "--foreground", f"--key-file={key}", f"--socket={munge_socket}",
                                   f"--pid-file={root / 'munged.pid'}", f"--log-file={root / 'munged.log'}",
                                   f"--seed-file={root / 'munged.seed'}"], root, env, (root / "munged.log",))
        cluster.daemons.append(munged)
        _wait_ready(munged, munge_socket.exists, "created its socket")
        slurmctld = _start("slurmctld", ["slurmctld", "-D"], root, env, (root / "slurmctld.log",))
        cluster.daemons.append(slurmctld)
        _wait_ready(slurmctld, lambda: cluster.run("scontrol", "ping", check=False).stdout.rstrip().endswith("is UP"),
                    "answering scontrol ping")
        slurmd = _start("slurmd", ["slurmd", "-D"], root, env, (root / "slurmd.log",))
        cluster.daemons.append(slurmd)
        _wait_ready(slurmd, lambda: _node_state(cluster) == "idle", f"reporting node {node} idle")
        yield cluster
    finally:
        if any(daemon.name == "slurmctld" and daemon.process.poll() is None for daemon in cluster.daemons):
            _cancel_all(cluster)
        for daemon in reversed(cluster.daemons):
            _stop(daemon)
        shutil.rmtree(root, ignore_errors=True)
