"""``at-mem reproduce PLAN.toml --out DIR``: a whole table from one command.

A plan (``configs/plans/*.toml``, read and checked by ``at_memorization.plan``) names the runs of a
study, the evaluations of their checkpoints, and the report. This module works out which runs and
evaluations are done from the files in ``DIR`` (so a rerun does only what is missing, and an
interrupted run resumes exactly), and runs the rest as child ``at-mem train`` / ``at-mem evaluate``
processes, ``--jobs`` at a time, each with its share of the CPU threads and a device of its own when
several are given. Then it writes ``DIR/report.md`` (+ json),
the curves and ``DIR/README.md``.

Why child processes rather than calls: a run that fails (diverges, runs out of memory, meets a
bug) ends its own process and nothing else; each child owns its run folder's lock and its own
signal handling, which already stops at a step with a checkpoint; and thread counts are per process.

The layout of ``DIR``::

    plan.toml             the plan as given (a later call with another plan is refused)
    status.json           per task: state, attempts, seconds, exit status, error; per call: times
    settings/NAME.json    the settings of run NAME (what ``at-mem train --config`` reads)
    runs/NAME/            the run folders (NAME = ARM-sSEED)
    logs/NAME.train.log   the children's output; logs/NAME.eval-K.log per evaluation
    report.md, report.json, curves-by-method.png, memorization.json (when asked), README.md

This module imports no torch: planning, ``--dry-run`` and a rerun with nothing to do are instant.
"""

from __future__ import annotations

import datetime
import fnmatch
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .atomic import check_writable_folder, write_text_atomic
from .machine import machine_description
from .plan import DEVICE_NAME, DEVICE_NAMES_HINT, EvaluationSpec, Plan, PlanError, PlannedRun, read_plan
from .records import ATTACK_NAMES, NoEvaluatedEpoch, best_record
from .runlock import LOCK_NAME, RunLock, RunLockError, check_free
from .report import ReportError, group_runs, read_run  # reading run folders needs no torch
from .runfolder import RunFolder
from .settings import SETTINGS_BY_NAME, SavedSettingDiffers, resume_settings
from .user_errors import UserError

# The children: this Python's at-mem. -P (3.11+): the working folder must not shadow the installed
# package (a source checkout's folder lacks the installed layout's at_memorization.plugins).
_AT_MEM = [sys.executable, *(["-P"] if sys.version_info >= (3, 11) else []), "-m", "at_memorization"]
STATUS_FORMAT = 1
LOCK_WAIT_S = 120  # how long a task waits for its run folder to be released by another process
STATUS_EVERY_S = 30  # status.json is rewritten at least this often: a SIGKILL loses less time than this


_ANOTHER_CALL = "another at-mem reproduce works on this study"


def _left_by_a_claim(name: str) -> bool:
    """A file that a call claiming a new DIR makes before its plan.toml is in place (the lock, the
    lock's temporaries, plan.toml's temporary), or that a call killed meanwhile leaves behind: a
    folder holding only these is still new."""
    return name == LOCK_NAME or name.startswith((f"{LOCK_NAME}.", ".plan.toml."))


# --------------------------------------------------------------------------- what is done
def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@dataclass
class RunState:
    """What the files of one run folder say (read without torch)."""

    epochs_done: int = 0
    epochs: int | None = None
    best_epoch: int | None = None
    has_checkpoint: bool = False

    @property
    def finished(self) -> bool:
        # metrics.jsonl gets an epoch's line only after its checkpoint is saved, so complete records
        # mean a finished run; its checkpoints may be gone (a study's records committed without
        # them): then it is not trained again, which would overwrite the records.
        return self.epochs is not None and self.epochs_done >= self.epochs


def run_state(run_dir: Path) -> RunState:
    folder = RunFolder(run_dir)
    config = _read_json(folder.config)
    epochs = None
    if isinstance(config, dict) and isinstance(config.get("config"), dict):
        epochs = config["config"].get("epochs")
    records = [r for r in folder.read_metrics_so_far() if isinstance(r.get("epoch"), int)]
    try:
        best = best_record(records)  # the rule the trainer and the report use
    except NoEvaluatedEpoch:  # none yet
        best = None
    return RunState(epochs_done=max((r["epoch"] for r in records), default=0), epochs=epochs,
                    best_epoch=None if best is None else best["epoch"],
                    has_checkpoint=folder.last.is_file())


def missing_attacks(run_dir: Path, spec: EvaluationSpec, state: RunState) -> dict[str, list[str]]:
    """checkpoint -> the spec's attacks that RUN/eval/<checkpoint>.json does not hold yet, at the
    spec's number of points and for the checkpoint's current epoch."""
    missing = {}
    for checkpoint in spec.checkpoints:
        record = _read_json(RunFolder(run_dir).eval_path(checkpoint))
        epoch = state.epochs_done if checkpoint == "last" else state.best_epoch
        if not isinstance(record, dict) or record.get("epoch") != epoch:
            missing[checkpoint] = list(spec.attacks)
            continue
        counts = record.get("n_examples_by_attack") or {}
        # A test split smaller than n_examples is used whole (RobustBench's first-N rule): then its
        # size is the number to find (the evaluation records it as test_split_size).
        split = record.get("test_split_size")
        wanted = min(spec.n_examples, split) if isinstance(split, int) else spec.n_examples
        todo = [a for a in spec.attacks if f"{a}_acc" not in record or counts.get(a, record.get("n_examples"))
                != wanted]
        if todo:
            missing[checkpoint] = todo
    return missing


# --------------------------------------------------------------------------- tasks
@dataclass
class Task:
    key: str  # "NAME/train" or "NAME/eval-K"
    run: PlannedRun
    kind: str  # "train" or "eval"
    spec: EvaluationSpec | None = None
    state: str = "pending"  # pending, done, failed, skipped, running
    detail: str = ""
    process: subprocess.Popen | None = None
    started: float = 0.0
    earlier_seconds: float = 0.0  # its time in earlier attempts (status.json), this attempt's added to it
    log: Path | None = None

    @property
    def label(self) -> str:
        return f"{self.kind} {self.run.name}" + ("" if self.spec is None else f" ({self.spec.describe()})")


@dataclass
class Options:
    out: Path
    jobs: int = 1
    devices: tuple[str, ...] = ()
    threads: int | None = None
    data_dir: str | None = None
    only: tuple[str, ...] = ()
    dry_run: bool = False
    prepare: bool = False  # write plan.toml and settings/NAME.json, run nothing (for torchrun by hand)
    echo: Callable[[str], None] = print
    poll_seconds: float = 0.5


class ReproduceError(UserError, ValueError):
    """A call that cannot go on (another plan in DIR, a bad option): one line."""


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _format_seconds(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


class Reproduction:
    """One call of ``at-mem reproduce``: the plan, DIR, the tasks and their children."""

    def __init__(self, plan: Plan, options: Options):
        self.plan, self.options = plan, options
        self.out = options.out
        self.runs_dir, self.logs_dir, self.settings_dir = self.out / "runs", self.out / "logs", self.out / "settings"
        self.status_path = self.out / "status.json"
        self.status = self._read_status()
        self._documents: dict[str, dict] = {}  # run name -> its settings document (settings_document)
        self.stop_signal: int | None = None
        self.devices = options.devices or ((plan.device,) if plan.device else ())
        self.tasks = self._make_tasks()
        self.ran_any = False
        self.announce: str | None = None  # what a signal handler asks the loop to print
        self.waiting: dict[str, float] = {}  # task key -> since when its run folder is busy elsewhere
        self._call = self._call_start = None
        self._pending_count = 0
        self._saved_at = time.monotonic()

    # -- DIR and its status file
    def _read_status(self) -> dict:
        status = _read_json(self.status_path)
        if not isinstance(status, dict) or status.get("format") != STATUS_FORMAT:
            status = {"format": STATUS_FORMAT, "plan": None, "tasks": {}, "calls": []}
        status.setdefault("tasks", {})
        status.setdefault("calls", [])
        return status

    def _save_status(self) -> None:
        if self.options.dry_run:
            return
        # Kept current, the call's and each running task's time: a call killed by SIGKILL (a session's
        # end) still counts up to its last save, at most STATUS_EVERY_S ago.
        now = time.monotonic()
        if self._call is not None:
            self._call["seconds"] = round(now - self._call_start, 1)
        for task in self.tasks:
            if task.process is not None:
                self.status["tasks"][task.key]["seconds"] = round(task.earlier_seconds + now - task.started, 1)
        self._saved_at = now
        write_text_atomic(json.dumps(self.status, indent=2) + "\n", self.status_path)

    def check_out_dir(self) -> None:
        """DIR is new, or holds this plan: another plan's runs must not be mixed into its table.

        Checked once before DIR's lock (read-only, for --dry-run too) and again under it
        (``_recheck_under_lock``), where it decides: another call may claim DIR in between."""
        saved = self.out / "plan.toml"
        if self.out.exists() and not self.out.is_dir():
            raise ReproduceError(f"--out {self.out}: a file is in the way (give a folder)")
        if saved.is_file():
            if saved.read_text() != self.plan.text:
                raise ReproduceError(
                    f"{self.out} holds the runs of another plan ({saved} differs from {self.plan.path}): give another "
                    f"--out, or copy {self.plan.path} over {saved} if the change is meant to apply to these runs (each "
                    "run's settings are still checked against its saved ones)")
        elif self.out.is_dir():
            try:  # a live lock and no plan.toml yet: another call is claiming DIR (this call's own lock passes)
                check_free(self.out)
            except RunLockError as error:
                raise ReproduceError(f"{_ANOTHER_CALL}: {str(error).splitlines()[0]}") from None
            if any(not _left_by_a_claim(p.name) for p in self.out.iterdir()):
                if saved.is_file():  # another call claimed DIR since the first look above: judge its plan
                    return self.check_out_dir()
                raise ReproduceError(f"--out {self.out} is not empty and holds no plan.toml: give a new folder")

    def _recheck_under_lock(self) -> list[Task]:
        """DIR's checks and state read again once this call holds DIR's lock, the pending tasks
        returned: since the first look, another call may have claimed DIR for another plan, or run tasks
        (its status.json records too, which this call must extend, not overwrite)."""
        self.check_out_dir()
        self.check_saved_settings()
        self.status = self._read_status()
        self.refresh()
        pending = [t for t in self.tasks if t.state == "pending"]
        self._pending_count = len(pending)
        return pending

    def check_saved_settings(self) -> None:
        """Every run folder that exists was trained with the plan's settings (as ``at-mem train
        --resume`` checks them): an edited plan must not mix its results into the table silently,
        and a finished run would never be checked otherwise. Compared whole, as resolved values: a
        setting removed from the plan (its default then applies) differs as a changed one does."""
        for run in {t.run.name: t.run for t in self.tasks}.values():
            saved = _read_json(RunFolder(self.run_dir(run)).config)
            if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
                continue
            derived = saved.get("derived") if isinstance(saved.get("derived"), list) else []
            given, given_method = run.whole_settings(derived)
            try:
                resume_settings(saved["config"], dict(saved.get("method") or {}), given, given_method, {},
                                run.accepted, complete=True)
            except SavedSettingDiffers as error:
                raise ReproduceError(f"{self.run_dir(run)} was trained with other settings than the plan's: "
                                     f"{error.difference}; restore the plan, or move the run folder away to train "
                                     "it anew") from None

    def settings_document(self, run: PlannedRun) -> dict:
        """What settings/NAME.json holds: the run's settings, data_dir made absolute (a child's
        config.json then names the data wherever the study is read from)."""
        if run.name not in self._documents:
            document = run.settings_document()
            data_dir = self.options.data_dir or document.get("data_dir") or SETTINGS_BY_NAME["data_dir"].default
            document["data_dir"] = os.path.abspath(os.path.expanduser(data_dir))
            self._documents[run.name] = document
        return dict(self._documents[run.name])

    def check_data(self, strict: bool = True) -> None:
        """A data folder that is not there: an error for data that cannot be downloaded, a note
        for data that the runs will download."""
        for dataset, data_dir in sorted({(self.settings_document(r).get("dataset") or SETTINGS_BY_NAME["dataset"].default,
                                          self.settings_document(r)["data_dir"]) for r in self.plan.runs}):
            if Path(data_dir).exists():
                continue
            where = "--data-dir" if self.options.data_dir else f"data_dir in {self.plan.path} (relative to {os.getcwd()})"
            if dataset in ("cifar10-exact", "imagefolder") and strict:
                raise ReproduceError(f"{data_dir} does not exist ({where}); {dataset} cannot be downloaded: run from "
                                     "the folder the plan expects or give --data-dir")
            what = (f"the runs will download {dataset} into it" if dataset not in ("cifar10-exact", "imagefolder")
                    else f"{dataset} cannot be downloaded: give --data-dir")
            self.options.echo(f"note: {data_dir} does not exist ({where}): {what}")

    def write_settings(self) -> None:
        for run in {t.run.name: t.run for t in self.tasks}.values():
            write_text_atomic(json.dumps(self.settings_document(run), indent=2) + "\n",
                          self.settings_dir / f"{run.name}.json")

    # -- tasks
    def _selected(self, run: PlannedRun) -> bool:
        return not self.options.only or any(fnmatch.fnmatchcase(run.name, p) for p in self.options.only)

    def _make_tasks(self) -> list[Task]:
        tasks = []
        for run in self.plan.runs:
            if not self._selected(run):
                continue
            tasks.append(Task(f"{run.name}/train", run, "train"))
            for spec in self.plan.evaluations:
                if spec.applies_to(run.arm.name, run.seed):
                    tasks.append(Task(f"{run.name}/eval-{spec.index}", run, "eval", spec))
        return tasks

    def run_dir(self, run: PlannedRun) -> Path:
        return self.runs_dir / run.name

    def refresh(self) -> None:
        """Mark what the files say is done (a task may have been done by another call)."""
        for task in self.tasks:
            if task.state in ("running", "failed", "skipped"):
                continue
            state = run_state(self.run_dir(task.run))
            if task.kind == "train":
                task.state = "done" if state.finished else "pending"
                if state.has_checkpoint and not state.finished:
                    task.detail = (f"resumes after epoch {state.epochs_done} of {state.epochs}" if state.epochs
                                   else "resumes; its config.json cannot be read and is rewritten from its checkpoint")
            else:
                if state.finished and not missing_attacks(self.run_dir(task.run), task.spec, state):
                    task.state = "done"
                else:
                    task.state = "pending"

    def _train_task(self, run: PlannedRun) -> Task:
        return next(t for t in self.tasks if t.run is run and t.kind == "train")

    def _ready(self) -> list[Task]:
        # One task per run folder at a time: two evaluations of a run would both rewrite its
        # eval/<checkpoint>.json (each merging into what it read before the other wrote).
        busy = {t.run.name for t in self.tasks if t.state == "running"}
        ready = []
        for task in self.tasks:
            if task.state != "pending":
                continue
            if task.kind == "eval":
                train = self._train_task(task.run)
                if train.state in ("failed", "skipped"):
                    task.state, task.detail = "skipped", "its training failed"
                    continue
                if train.state != "done":
                    continue
                state = run_state(self.run_dir(task.run))
                if state.finished and not missing_attacks(self.run_dir(task.run), task.spec, state):
                    # its records were there all along: e.g. a finished, evaluated run whose lost
                    # metrics.jsonl lines the training task restored from the checkpoint
                    task.state = "done"
                    if task.key in self.status["tasks"]:
                        self.status["tasks"][task.key]["state"] = "done"
                        self.status["tasks"][task.key].pop("error", None)
                    continue
                if not state.has_checkpoint:
                    task.state = "failed"
                    task.detail = (f"{self.run_dir(task.run)} holds the run's records but not its checkpoints (e.g. "
                                   "a checkout of committed records): move the folder away to train it again")
                    self.status["tasks"].setdefault(task.key, {"seconds": 0.0, "attempts": 0}).update(
                        state="failed", error=task.detail)
                    self.options.echo(f"[{self._counts()}] FAILED {task.label}: {task.detail}")
                    continue
            if task.run.name in busy:
                continue
            if not self._free(task):
                continue
            busy.add(task.run.name)
            ready.append(task)
        # Evaluations first: a finished run's numbers come before the next run starts.
        return sorted(ready, key=lambda t: t.kind != "eval")

    def _free(self, task: Task) -> bool:
        """Whether no other live process holds the task's run folder (e.g. a child of a killed call
        still saving, or a run started by hand); a task waits up to LOCK_WAIT_S for it."""
        try:
            check_free(self.run_dir(task.run))
        except RunLockError as error:
            since = self.waiting.setdefault(task.key, time.monotonic())
            if since == self.waiting[task.key] and time.monotonic() - since < self.options.poll_seconds:
                self.options.echo(f"waiting: {str(error).splitlines()[0]}")
            if time.monotonic() - since > LOCK_WAIT_S:
                task.state, task.detail = "failed", str(error).splitlines()[0]
                record = self.status["tasks"].setdefault(task.key, {"seconds": 0.0, "attempts": 0})
                record.update(state="failed", error=task.detail)
                self.options.echo(f"[{self._counts()}] FAILED {task.label}: {task.detail}")
                self._save_status()
            return False
        self.waiting.pop(task.key, None)
        return True

    def _command(self, task: Task, device: str | None) -> list[str]:
        run_dir = self.run_dir(task.run)
        base = _AT_MEM
        if task.kind == "train":
            settings = self.settings_dir / f"{task.run.name}.json"
            command = [*base, "train", "--config", str(settings), "--out", str(run_dir), "--quiet"]
            if run_state(run_dir).has_checkpoint:
                command.append("--resume")
        else:
            state = run_state(run_dir)
            missing = missing_attacks(run_dir, task.spec, state)
            attacks = [a for a in ATTACK_NAMES if any(a in todo for todo in missing.values())]
            command = [*base, "evaluate", str(run_dir), "--checkpoints", ",".join(missing),
                       "--n-examples", str(task.spec.n_examples)]
            for attack in attacks:
                command += ["--attack", attack]
            if task.spec.batch_size:
                command += ["--batch-size", str(task.spec.batch_size)]
            command += ["--data-dir", self.settings_document(task.run)["data_dir"]]
        if device:
            command += ["--device", device]
        return command

    def _threads(self) -> int:
        if self.options.threads:
            return self.options.threads
        try:
            cpus = len(os.sched_getaffinity(0))  # the CPUs this process may use (affinity, cpusets)
        except (AttributeError, OSError):
            cpus = os.cpu_count() or 1
        at_once = min(self.options.jobs, max(1, self._pending_count or len(self.tasks)))
        return max(1, cpus // at_once)

    def _start(self, task: Task, slot: int) -> None:
        device = self.devices[slot % len(self.devices)] if self.devices else None
        if task.kind == "train":
            write_text_atomic(json.dumps(self.settings_document(task.run), indent=2) + "\n",
                          self.settings_dir / f"{task.run.name}.json")
        command = self._command(task, device)
        threads = self._threads()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "PYTHONUNBUFFERED": "1"}
        suffix = "train" if task.kind == "train" else f"eval-{task.spec.index}"
        task.log = self.logs_dir / f"{task.run.name}.{suffix}.log"
        task.log.parent.mkdir(parents=True, exist_ok=True)
        self.run_dir(task.run).parent.mkdir(parents=True, exist_ok=True)
        with task.log.open("a") as log:
            log.write(f"\n# {_now()}: {' '.join(command)} (OMP_NUM_THREADS={threads})\n")
            log.flush()
            # A session of its own: the terminal's Ctrl-C reaches this process only, which then
            # stops every child the way it chooses (SIGTERM: each writes its checkpoint).
            task.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True, stdin=subprocess.DEVNULL,
                                            preexec_fn=_stop_with_parent)
        if self.stop_signal is not None:  # the stop came while Popen ran: _on_signal did not see this child
            _signal(task.process, signal.SIGTERM)
        task.state, task.started = "running", time.monotonic()
        record = self.status["tasks"].setdefault(task.key, {"seconds": 0.0, "attempts": 0})
        record["attempts"] += 1
        task.earlier_seconds = record.get("seconds", 0.0)
        record.update(state="running", started=_now(), command=command, log=str(task.log.relative_to(self.out)))
        self._save_status()
        where = f" on {device}" if device else ""
        note = f", {task.detail}" if task.kind == "train" and task.detail else ""
        self.options.echo(f"[{self._counts()}] started {task.label}{where}, {threads} thread"
                          f"{'s' if threads > 1 else ''}{note}; log: {task.log}")

    def _counts(self) -> str:
        done = sum(t.state == "done" for t in self.tasks)
        return f"{done}/{len(self.tasks)} done"

    def _finish(self, task: Task, code: int) -> None:
        seconds = time.monotonic() - task.started
        record = self.status["tasks"][task.key]
        record["seconds"] = round(task.earlier_seconds + seconds, 1)
        record["exit_status"] = code
        record["ended"] = _now()
        task.process = None
        # After a stop request every child that ends without finishing was stopped by it (one still
        # importing dies of the signal itself, exit status -15), not failed.
        stopped = self.stop_signal is not None
        state = run_state(self.run_dir(task.run))
        complete = state.finished if task.kind == "train" else not missing_attacks(
            self.run_dir(task.run), task.spec, state)
        if code == 0 or (stopped and complete):  # complete files: done, whatever ended it after the stop
            if complete:
                task.state = record["state"] = "done"
                record.pop("error", None)
                self.options.echo(f"[{self._counts()}] done {task.label} in {_format_seconds(seconds)}")
            else:  # exit 0 without the files (e.g. a signal after the last step): try again next call
                task.state = record["state"] = "stopped" if self.stop_signal else "failed"
                record["error"] = "exited without completing its files"
                if not self.stop_signal:
                    self.options.echo(f"[{self._counts()}] FAILED {task.label}: {record['error']}; log: {task.log}")
        elif stopped:
            task.state = record["state"] = "stopped"
            saved = task.kind == "train" and run_state(self.run_dir(task.run)).has_checkpoint
            self.options.echo(f"stopped {task.label} after {_format_seconds(seconds)}"
                              + (f" (its checkpoint is in {self.run_dir(task.run)})" if saved else ""))
        else:
            task.state = record["state"] = "failed"
            record["error"] = last_error_line(task.log) or f"exit status {code}"
            self.options.echo(f"[{self._counts()}] FAILED {task.label} (exit status {code}): {record['error']}; "
                              f"log: {task.log}")
        self._save_status()

    # -- signals
    def _on_signal(self, signum, frame) -> None:
        # No printing here (a print interrupted by a print raises): the loop prints ``announce``.
        name = signal.Signals(signum).name
        if self.stop_signal is None:
            self.stop_signal = signum
            running = [t for t in self.tasks if t.process is not None]
            self.announce = (f"\n{name}: stopping {len(running)} running task(s); each training run saves a "
                             "checkpoint (again to stop at once) ...")
            for task in running:
                _signal(task.process, signal.SIGTERM)
        else:  # a second signal: the children stop at once (their files on disk stay complete)
            for task in self.tasks:
                if task.process is not None:
                    _signal(task.process, signal.SIGINT)

    # -- the loop
    def execute(self) -> int:
        """Run what is missing; returns the exit status (0; 1 when a task or an output failed;
        128 + the signal's number when stopped)."""
        self.refresh()
        pending = [t for t in self.tasks if t.state == "pending"]
        self._pending_count = len(pending)
        if self.options.dry_run:
            self._print_plan()
            self.check_data(strict=False)
            return 0
        # The handlers cover the whole call, the report included: a stop is always a clean stop.
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in previous:
            signal.signal(s, self._on_signal)
        lock = None
        try:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise ReproduceError(f"--out {self.out}: cannot create it ({error.strerror or error})") from None
            if pending or self.options.prepare:
                try:
                    lock = RunLock(self.out).acquire()  # one call per DIR at a time
                except OSError as error:  # e.g. a read-only DIR: one line, not the lock file's traceback
                    raise ReproduceError(f"--out {self.out}: cannot write in it ({error.strerror or error})") from None
                pending = self._recheck_under_lock()
            if not (self.out / "plan.toml").is_file():
                write_text_atomic(self.plan.text, self.out / "plan.toml")
            if pending:  # before a task starts: a file in the way of DIR's folders is one line, not a traceback
                for folder in (self.runs_dir, self.logs_dir, self.settings_dir):
                    check_writable_folder(folder, "--out")
            if self.options.prepare:
                self.write_settings()
                self.options.echo(f"prepared {self.out}: plan.toml and {len(self.plan.runs)} settings files "
                                  f"in {self.settings_dir}; nothing was run")
                return 0
            return self._execute(pending)
        finally:
            if lock is not None:
                try:
                    lock.release()
                except OSError:  # DIR made read-only meanwhile: the error that stopped this call says so,
                    pass  # and the next call takes over the lock of this (then ended) process
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _execute(self, pending: list[Task]) -> int:
        start = time.monotonic()
        total = len(self.tasks)
        if pending:  # a call that runs nothing is not recorded (and changes no file)
            self._call = {"started": _now(), "jobs": self.options.jobs, "devices": list(self.devices),
                          "threads": self._threads(), "machine": machine_description(self.devices),
                          "command": self.command_line()}
            self._call_start = start
            self.status["plan"] = str(self.plan.path)
            self.status["calls"].append(self._call)
            self._save_status()
            done = total - len(pending)
            self.options.echo(f"{self.plan.name}: {len(pending)} of {total} task(s) to run ({done} done), "
                              f"{self.options.jobs} at a time; records in {self.out}")
        else:
            self.options.echo(f"nothing to run: all {total} task(s) of {self.plan.name} are done in {self.out}")
        try:
            self._loop()
            problems = [] if self.stop_signal is not None else self.write_outputs()
        finally:
            if self._call is not None:
                self._call["ended"] = _now()
                self._save_status()
        if self.announce:
            self.options.echo(self.announce)
        if self.stop_signal is not None:
            self.options.echo(f"stopped by {signal.Signals(self.stop_signal).name}; nothing is lost: continue with the "
                              f"same command ({self.command_line()})")
            return 128 + self.stop_signal
        failed = [t for t in self.tasks if t.state == "failed"]
        skipped = [t for t in self.tasks if t.state == "skipped"]
        if failed:
            self.options.echo(f"{len(failed)} task(s) failed ({', '.join(t.label for t in failed)})"
                              + (f", {len(skipped)} skipped" if skipped else "")
                              + f"; the others are done. See {self.out / 'README.md'}; the same command retries "
                              "the failed ones")
            return 1
        if problems:
            self.options.echo(f"{len(problems)} problem(s) with the outputs (above); the same command tries again")
            return 1
        return 0

    def command_line(self, *, only: bool = True) -> str:
        """The command that continues this study, with the options of this call (without its
        ``--only`` patterns when ``only`` is false: the command that continues every run)."""
        parts = ["at-mem", "reproduce", str(self.plan.path), "--out", str(self.out)]
        if self.options.jobs > 1:
            parts += ["--jobs", str(self.options.jobs)]
        if self.options.devices:
            parts += ["--device", ",".join(self.options.devices)]
        if self.options.threads:
            parts += ["--threads", str(self.options.threads)]
        if self.options.data_dir:
            parts += ["--data-dir", self.options.data_dir]
        for pattern in self.options.only if only else ():
            parts += ["--only", f"'{pattern}'"]
        return " ".join(parts)

    def _loop(self) -> None:
        slots: dict[int, Task | None] = {i: None for i in range(self.options.jobs)}
        while True:
            if self.announce:
                self.options.echo(self.announce)
                self.announce = None
            for slot, task in slots.items():
                if task is not None and task.process is not None:
                    code = task.process.poll()
                    if code is not None:
                        self._finish(task, code)
                        self.ran_any = True
                        slots[slot] = None
            if self.stop_signal is None:
                ready = self._ready()
                for slot in slots:
                    if self.stop_signal is not None:
                        break
                    if slots[slot] is None and ready:
                        task = ready.pop(0)
                        self._start(task, slot)
                        slots[slot] = task
            if all(t is None for t in slots.values()):
                if self.stop_signal is not None:
                    return
                if not self._ready():
                    if not self.waiting:
                        return
                    time.sleep(self.options.poll_seconds)  # a run folder busy elsewhere: wait for it
                continue
            if time.monotonic() - self._saved_at >= STATUS_EVERY_S:
                self._save_status()
            time.sleep(self.options.poll_seconds)

    def _print_plan(self) -> None:
        echo = self.options.echo
        echo(f"plan {self.plan.name} ({self.plan.path}): {len(self.plan.arms)} arm(s), seeds "
             f"{', '.join(map(str, self.plan.seeds))}: {len(self.plan.runs)} run(s); {len(self.tasks)} task(s), {self.options.jobs} at a time, {self._threads()} thread(s) each")
        for task in self.tasks:
            detail = f" ({task.detail})" if task.detail and task.state == "pending" else ""
            echo(f"  {task.state:8} {task.label}{detail}")

    # -- the outputs
    def finished_runs(self) -> list[Path]:
        return [self.run_dir(r) for r in self.plan.runs if run_state(self.run_dir(r)).finished]

    def _fingerprint(self, runs: list[Path]) -> str:
        digest = hashlib.sha256()
        for run in runs:
            for path in RunFolder(run).report_files():
                if path.is_file():
                    stat = path.stat()
                    digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        digest.update(self.plan.text.encode())
        return digest.hexdigest()

    def write_outputs(self) -> list[str]:
        """report.md/json, the curves, memorization.json and README.md, over the finished runs; not
        rewritten when nothing changed since they were written. Returns the problems: what could not be
        written, and the runs left out of the table."""
        runs = self.finished_runs()
        if not runs:
            self.options.echo("no finished run yet: no report")
            if self.ran_any:
                self._write_readme([], [])  # it still says what failed or is unfinished
            return []
        fingerprint = self._fingerprint(runs)
        outputs = [self.out / "report.md", self.out / "README.md"]
        if (not self.ran_any and self.status.get("outputs_fingerprint") == fingerprint
                and all(p.is_file() for p in outputs)):
            self.options.echo(f"{self.out / 'report.md'} is up to date")
            return []
        # A run whose files `at-mem report` cannot read (e.g. an eval record cut by a full disk) is left
        # out of the outputs, with the reason: it must not keep the other runs' table from being made.
        runs, left_out = self._readable(runs)
        written, problems = [], [f"{name} left out of the table and curves: {why}" for name, why in left_out.items()]
        base = _AT_MEM
        try:
            paired = self._paired_args(runs)
        except ReportError as error:  # the report below says what is wrong with the runs
            paired = []
            problems.append(f"--paired left out: {str(error).splitlines()[0]}")
        steps = [("report.md", [*base, "report", *map(str, runs), *paired, "--output",
                                str(self.out / "report.md")]),
                 ("report.json", [*base, "report", *map(str, runs), *paired, "--format", "json",
                                  "--output", str(self.out / "report.json")]),
                 ("curves-by-method.png", [*base, "plot", *map(str, runs), "--by-method", "--output",
                                           str(self.out / "curves-by-method.png")])]
        seed = self.plan.plot_seed if self.plan.plot_seed is not None else self.plan.seeds[0]
        seed_runs = [self.run_dir(r) for r in self.plan.runs if r.seed == seed and self.run_dir(r) in runs]
        if seed_runs:
            steps.append((f"curves-seed{seed}.png", [*base, "plot", *map(str, seed_runs), "--output",
                                                     str(self.out / f"curves-seed{seed}.png")]))
        if self.plan.late_after is not None:
            steps.append(("memorization.json", [*base, "memorization", *map(str, runs), "--late-after",
                                                str(self.plan.late_after), "--output",
                                                str(self.out / "memorization.json")]))
        for name, command in steps if runs else ():  # no readable run: nothing to make
            if self.stop_signal is not None:  # stopped while writing: the next call writes them
                return problems
            # Its own session, as the tasks: a Ctrl-C reaches this process, which stops after this step.
            result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                    start_new_session=True, preexec_fn=_stop_with_parent)
            if result.returncode == 0:
                written.append(name)
            else:
                lines = [l for l in (result.stderr + result.stdout).splitlines() if l.strip()]
                problems.append(f"{name}: {lines[-1] if lines else f'exit status {result.returncode}'}")
        self._write_readme(runs, problems, left_out=left_out, table_made="report.md" in written)
        written.append("README.md")
        self.status["outputs_fingerprint"] = fingerprint if not problems else None
        self._save_status()
        self.options.echo(f"wrote {', '.join(str(self.out / n) for n in written)}")
        for problem in problems:
            self.options.echo(f"warning: {problem}")
        return problems

    def _readable(self, runs: list[Path]) -> tuple[list[Path], dict[str, str]]:
        """The runs `at-mem report` can read, and run name -> why for the others."""
        readable, left_out = [], {}
        for run in runs:
            try:
                read_run(run)
            except ReportError as error:
                left_out[run.name] = str(error).splitlines()[0]
            else:
                readable.append(run)
        return readable, left_out

    def _paired_args(self, runs: list[Path]) -> list[str]:
        """``--paired`` in the report's labels, for the pairs whose arms both have finished runs."""
        labels = self._labels(runs)
        args = []
        for spec in self.plan.paired:
            base, _, other = spec.partition(":")
            if base in labels and other in labels:
                args += ["--paired", f"{labels[base]}:{labels[other]}"]
        return args

    def _labels(self, runs: list[Path]) -> dict[str, str]:
        """Each arm's group label in the report: its method, with the settings that differ appended
        when arms share a method (report.group_runs decides; the plan speaks of arms)."""
        arm_of = {self.run_dir(r): r.arm.name for r in self.plan.runs}
        labels = {}
        for group in group_runs([read_run(run) for run in runs]):
            for run in group.runs:
                labels.setdefault(arm_of.get(Path(run.path)), group.label)
        return labels

    def _write_readme(self, runs: list[Path], problems: list[str], *, left_out: dict[str, str] | None = None,
                      table_made: bool = False) -> None:
        """``runs``: those in the table; ``left_out``: finished runs left out of it, and why;
        ``table_made``: whether this call wrote report.md (else the file, if any, is an earlier call's)."""
        plan, status = self.plan, self.status
        if getattr(self, "_call", None) is not None:  # this call so far, the report and plots included
            self._call["seconds"] = round(time.monotonic() - self._call_start, 1)
        calls = status.get("calls", [])
        wall = sum(c.get("seconds", 0.0) for c in calls)
        machine = calls[-1].get("machine", {}) if calls else {}
        lines = [f"# {plan.name}", ""]
        if plan.description:
            lines += [plan.description.strip(), ""]
        lines += ["Made by `at-mem reproduce`; run it again to continue or to refresh this page:", "", "```bash",
                  self.command_line(only=False), "```", ""]
        if self.options.only:  # a call limited to some runs; the page is the whole study's
            lines += [f"(The last call ran only the runs matching {' '.join(repr(p) for p in self.options.only)}: "
                      f"`{self.command_line()}`.)", ""]
        lines += [f"- Plan: [`plan.toml`](plan.toml) ({len(plan.runs)} runs of {len(plan.arms)} arms: "
                  f"{', '.join(a.name for a in plan.arms)}; seeds {', '.join(map(str, plan.seeds))}).",
                  f"- Machine: {machine.get('cpu', '?')} ({machine.get('cpu_count', '?')} CPUs)"
                  + (f", {', '.join(machine['gpus'])}" if machine.get("gpus") else "")
                  + (f"; torch {machine['torch']}" if machine.get("torch") else "") + ".",
                  f"- The last call: devices {', '.join(self.devices) or 'the default (cuda when available)'}; "
                  f"{self.options.jobs} task(s) at a time, {self._threads()} thread(s) each (each call's machine, "
                  "jobs and threads are in status.json).",
                  f"- Wall time: {_format_seconds(wall)} over {len(calls)} call(s) of the command"
                  f" (training and evaluation: {_format_seconds(self._task_seconds('train'))} and "
                  f"{_format_seconds(self._task_seconds('eval'))} of child time).", ""]
        failed = [t for t in self.tasks if t.state in ("failed", "skipped")]
        unfinished = [r for r in plan.runs if self.run_dir(r) not in runs]
        if failed or unfinished:
            lines += ["## Not complete", ""]
            for task in failed:
                error = status["tasks"].get(task.key, {}).get("error", task.detail)
                lines.append(f"- {task.state}: {task.label}: {error} (log: `{task.log.relative_to(self.out) if task.log else '-'}`)")
            for run in unfinished:
                if run.name in (left_out or {}):
                    lines.append(f"- {run.name}: not in the table: {left_out[run.name]}")
                    continue
                state = run_state(self.run_dir(run))
                lines.append(f"- {run.name}: {state.epochs_done} of {run.given.get('epochs', state.epochs) or '?'} "
                             "epochs: not in the table")
            lines.append("")
        lines += ["## Runs", "", "| run | epochs | best epoch | training | evaluations |", "|---|---|---|---|---|"]
        for run in plan.runs:
            state = run_state(self.run_dir(run))
            train = status["tasks"].get(f"{run.name}/train", {})
            evals = [v for k, v in status["tasks"].items() if k.startswith(f"{run.name}/eval-")]
            lines.append(f"| {run.name} | {state.epochs_done}/{state.epochs or '?'} | {state.best_epoch or '-'} | "
                         f"{_format_seconds(train.get('seconds', 0.0))} | "
                         f"{_format_seconds(sum(e.get('seconds', 0.0) for e in evals))} |")
        lines += ["", "Times are the children's wall times in the calls that ran them (summed over resumes).", ""]
        report = self.out / "report.md"
        if table_made:
            lines += ["## Table", "", "`at-mem report` over the finished runs ([report.md](report.md), "
                      "[report.json](report.json)):", "", report.read_text().strip(), ""]
        elif report.is_file():  # an earlier call's table would contradict the lists above
            lines += ["## Table", "", "No table this time" + (" (see the problems below)" if problems else "")
                      + ": report.md and report.json are from an earlier call and out of date.", ""]
        for name in sorted(p.name for p in self.out.glob("curves*.png")):
            lines += [f"![{name}]({name})", ""]
        if problems:
            lines += ["## Problems writing the outputs", ""] + [f"- {p}" for p in problems] + [""]
        write_text_atomic("\n".join(lines), self.out / "README.md")

    def _task_seconds(self, kind: str) -> float:
        return sum(v.get("seconds", 0.0) for k, v in self.status["tasks"].items()
                   if (k.endswith("/train") if kind == "train" else "/eval-" in k))


def _stop_with_parent() -> None:
    """In the child, before it runs: SIGTERM when this process dies, however it dies (even by
    SIGKILL, e.g. a time limit), so that no run goes on training, unwatched, after its parent is
    gone; SIGTERM makes it save a checkpoint and stop. Linux only (prctl); elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _signal(process: subprocess.Popen, signum: int) -> None:
    try:
        process.send_signal(signum)
    except (ProcessLookupError, OSError):
        pass


def last_error_line(log: Path | None) -> str:
    """The child's one-line error (``Error: ...``), else its last line."""
    if log is None:
        return ""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    lines = [line for line in lines if not line.startswith("# ")]
    errors = [line for line in lines if line.startswith("Error:")]
    line = errors[-1] if errors else (lines[-1] if lines else "")
    return line[:300]


def reproduce(plan_path: str | Path, options: Options) -> int:
    """Read the plan, check DIR and run what is missing; the exit status."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise ReproduceError("at-mem reproduce runs as one process, not under torchrun: it starts its runs itself "
                             "(for several GPUs give --device cuda:0,cuda:1 --jobs 2)")
    if options.jobs < 1:
        raise ReproduceError(f"--jobs must be at least 1, got {options.jobs}")
    plan = read_plan(plan_path)
    job = Reproduction(plan, options)
    if not job.tasks:
        raise ReproduceError(f"--only {' '.join(options.only)}: no run of the plan matches "
                             f"(runs: {', '.join(r.name for r in plan.runs)})")
    bad = [d for d in options.devices if not DEVICE_NAME.fullmatch(d)]
    if bad:
        raise ReproduceError(f"--device {bad[0]!r}: {DEVICE_NAMES_HINT} (a comma-separated list for several)")
    job.check_out_dir()  # read-only: a dry run must not show another plan's runs as done either
    job.check_saved_settings()
    if not options.dry_run:
        job.check_data()
    try:
        return job.execute()
    except RunLockError as error:  # another call works on DIR
        raise ReproduceError(f"{_ANOTHER_CALL}: {str(error).splitlines()[0]}") from None


__all__ = ["Plan", "PlanError", "ReproduceError", "Options", "read_plan", "reproduce", "run_state",
           "missing_attacks"]
