#!/usr/bin/env python
"""The GPU suite: validate, benchmark and reproduce on a lent GPU, in stages that fit a short lease.

    python benchmarks/gpu/suite.py STAGE --out DIR [--cifar-dir DIR] [--budget-s S] [--tiny]

STAGE is ``runtime``, ``check``, ``profile``, ``speed``, ``reproduce``, several of them joined by
commas, or ``all`` (the five in that order, the most valuable first, so a lease cut short still
leaves the most useful results). ``--only STEP,STEP`` runs just the named steps (the environment is
always recorded); the others are recorded as skipped, "not selected". Each stage writes
``DIR/<stage>.json`` after every step (a kill keeps what finished) and never runs a step it has
no time left for: ``--budget-s`` is the time for everything, and a step that would start with
less than its minimum left is recorded as skipped, with the reason.

- ``runtime`` (issue 21, first in a lease): ``train_compile_vs_eager``: whole epochs of
  ``Trainer.fit`` as ``at-mem train`` runs them (``bench_train.py --full-epoch``: a smaller last
  batch, the per-epoch PGD-10 evaluation, checkpoints), eager and ``--compile``, with each epoch's
  time split into training, evaluation and checkpoints, the steady epoch's speed-up and the
  break-even epoch count; ``concurrency``: the aggregate images/s of 1, 2 and 3 concurrent
  training processes of batch 128 against one process of batch 256 and 384, eager and compiled
  (``benchmarks/concurrency.py``); ``attack_grads``: the attack's weight-gradient work before and
  after issue 21 in one run, with cuDNN's wgrad kernels counted (``benchmarks/attack_grads.py``).
- ``check``: environment (device, torch/CUDA/cuDNN, package versions), the CUDA-only tests
  (``pytest -m cuda``), bf16+channels_last against fp32 on the same 200 steps from the same
  initial weights, a 2-epoch run of each method with ``--bf16 --channels-last``, and
  ``at-mem evaluate --attack all`` (AutoAttack included) on 1,000 test points of one of them.
  The methods include the plugins AWP (pgd-at-awp, trades-awp, pgd-at-te-awp) and MART.
- ``profile``: ``benchmarks/profile_step.py``: kernel launches, device-busy time and the top
  operators of a PGD-AT step, eager, compiled, and compiled with CUDA graphs (step ``profile_pgd-at``).
- ``speed``: ``benchmarks/bench_train.py``: the package against the paper-style fp32 reference
  loop in fp32, in bf16+channels_last (with seconds per epoch and MFU of PreActResNet-18 and
  WRN-34-10 at batch 128 and 512), and with ``--compile``.
- ``reproduce``: ``at-mem reproduce configs/plans/gpu-suite-cifar10.toml --jobs 2``: PGD-AT and
  PGD-AT+TE side by side on 10,000 CIFAR-10 (JPEG) images for 30 epochs, best and final checkpoints
  evaluated, the report written; a second call in the same lease resumes what the first left. The
  study's records (README, report, logs, each run's config, metrics and evaluations) are packed into
  ``DIR/runs.tar.gz``.

``--tiny`` runs every stage on the CPU with MNIST, a small CNN and a few images in seconds: CI
runs it (tests/test_gpu_suite.py) so that the suite cannot rot between leases.
The device call that runs it is printed by benchmarks/gpu/prepare.sh; docs/gpu.md explains both.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("runtime", "check", "profile", "speed", "reproduce")
METHODS = ("pgd-at", "pgd-at-te", "trades", "trades-te")
PLUGIN_METHODS = ("pgd-at-awp", "trades-awp", "pgd-at-te-awp", "mart")
PACKAGES = ("at-memorization", "torch", "torchvision", "torchattacks", "robustbench", "pyautoattack", "timm",
            "click", "numpy")


# --------------------------------------------------------------------------- helpers
class Budget:
    """Seconds left for the whole suite; steps ask before they start."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run(command: list[str], *, cwd: Path, timeout: float, env: dict | None = None) -> dict:
    """Run a command; return its exit code, seconds and output tail (never raises)."""
    started = time.monotonic()
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=max(timeout, 1),
                              env={**os.environ, **(env or {})})
        rc, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as expired:
        rc = "timeout"
        output = "".join(x.decode() if isinstance(x, bytes) else (x or "") for x in (expired.stdout, expired.stderr))
    seconds = round(time.monotonic() - started, 2)
    print(f"  [{rc}] {seconds:7.1f} s  {' '.join(command[2:6])} ...", flush=True)
    return {"rc": rc, "ok": rc == 0, "seconds": seconds, "command": " ".join(command), "output_tail": tail(output)}


def at_mem(*args, cwd: Path, timeout: float) -> dict:
    # -P: the working directory's source tree must not shadow the installed package (whose
    # entry points name at_memorization.plugins, which only the installed layout has).
    return run([sys.executable, "-P", "-m", "at_memorization", *map(str, args)], cwd=cwd, timeout=timeout)


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def environment() -> dict:
    import torch

    info = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "versions": {}}
    for name in PACKAGES:
        try:
            info["versions"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info["versions"][name] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                    cudnn=torch.backends.cudnn.version())
        try:
            info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,power.limit",
                                                 "--format=csv"], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError) as error:
            info["nvidia_smi"] = f"unavailable: {error}"
    else:
        info["device_name"] = f"cpu: {platform.processor() or platform.machine()}"
    return info


class Settings:
    """Full-size settings for a GPU, or ``tiny`` ones that run on a CPU in seconds."""

    def __init__(self, tiny: bool, cifar_dir: str | None, device: str | None = None):
        self.tiny = tiny
        shared = Path(os.environ.get("AT_MEM_SHARED_DATA", ROOT.parent / "shared" / "data"))
        if tiny:
            self.device = "cpu"
            self.data = ["--dataset", "mnist", "--data-dir", str(shared / "mnist")]
            self.bench_data = ["--dataset", "mnist", "--data-dir", str(shared / "mnist")]
            self.model = "smallcnn"
            self.agree = dict(train_size=64, test_size=32, batch_size=16, steps=2, epochs=1)
            self.methods = dict(train_size=64, test_size=32, batch_size=16, steps=2, epochs=2)
            self.eval_attacks, self.eval_n = ["clean", "pgd20"], 32
            self.bench = ["--model", "smallcnn", "--batch-size", "16", "--iters", "2", "--warmup", "0",
                          "--repeats", "1", "--steps", "2", "--threads", "1"]
            self.estimate = ["--estimate-models", "smallcnn", "--estimate-batches", "16"]
            self.compile_methods = []
            # bench_train --full-epoch: 70 = 4 x 16 + 6, a smaller last batch
            self.compile_check = ["--model", "smallcnn", "--batch-size", "16", "--steps", "2", "--epochs", "2",
                                  "--train-size", "70", "--test-size", "32", "--eval-steps", "2", "--threads", "1"]
            self.compile_check_min_s = 1
            self.concurrency = ["--model", "smallcnn", "--steps", "2", "--iters", "2", "--warmup", "1", "--repeats", "1",
                                "--configs", "1x16t1", "2x16t1", "1x32t1", "--variants", "eager"]
            self.concurrency_min_s = 1
            self.attack_grads = ["--model", "smallcnn", "--batch-size", "16", "--steps", "2", "--iters", "2",
                                 "--repeats", "1", "--threads", "1", "--variants", "eager"]
            self.profile = ["--model", "smallcnn", "--batch-size", "16", "--iters", "2", "--steps", "2",
                            "--warmup", "1", "--variants", "eager"]
            self.reproduce_plan = ROOT / "configs" / "plans" / "smoke-mnist.toml"
            self.min_step_s = 1
        else:
            self.device = "cuda"
            if cifar_dir is None:
                raise SystemExit("error: --cifar-dir is needed (the CIFAR-10 JPEG image folder) unless --tiny")
            self.data = ["--dataset", "imagefolder", "--data-dir", cifar_dir]
            self.bench_data = self.data
            self.model = "preactresnet18"
            # 200 steps of batch 128 from the same initial weights, fp32 against bf16+channels_last.
            self.agree = dict(train_size=25_600, test_size=1000, batch_size=128, steps=10, epochs=1)
            self.methods = dict(train_size=10_000, test_size=1000, batch_size=128, steps=10, epochs=2)
            self.eval_attacks, self.eval_n = ["all"], 1000
            self.bench = ["--model", "preactresnet18", "--batch-size", "128", "--iters", "20", "--warmup", "1",
                          "--repeats", "3"]
            self.estimate = []  # bench_train's default: preactresnet18 and wrn34_10 at batch 128 and 512
            self.compile_methods = ["pgd-at", "pgd-at-te"]
            # Issue 21, item 3: whole epochs of Trainer.fit (training, per-epoch PGD-10 evaluation on
            # 2,000 test points, checkpoints), eager and --compile, bf16 + channels_last. 20,000 =
            # 156 x 128 + 32: a smaller last batch, as a real run has. 4 epochs: the first pays for
            # compilation, the other 3 give the steady epoch and so the break-even epoch count.
            self.compile_check = ["--model", "preactresnet18", "--batch-size", "128", "--steps", "10", "--epochs", "4",
                                  "--train-size", "20000", "--test-size", "2000", "--eval-steps", "10"]
            self.compile_check_min_s = 150
            # Issue 21, item 4: 1, 2 and 3 concurrent runs of batch 128 against one run of batch 256
            # and 384, eager and --compile (CUDA graphs).
            self.concurrency = ["--model", "preactresnet18", "--steps", "10", "--iters", "20", "--warmup", "2",
                                "--repeats", "3", "--configs", "1x128", "2x128", "3x128", "1x256", "1x384",
                                "--variants", "eager", "compile", "--bf16", "--channels-last"]
            self.concurrency_min_s = 120
            # Issue 21, item 1: the attack's weight gradients, before/after in one run
            self.attack_grads = ["--model", "preactresnet18", "--batch-size", "128", "--steps", "10", "--iters", "5",
                                 "--repeats", "3", "--bf16", "--channels-last"]
            self.profile = ["--model", "preactresnet18", "--batch-size", "128", "--iters", "10"]
            self.reproduce_plan = ROOT / "configs" / "plans" / "gpu-suite-cifar10.toml"
            self.min_step_s = 45
        self.device = device or self.device

    def train_args(self, method: str, out: Path, spec: dict, *extra) -> list:
        args = ["train", "--method", method, *self.data, "--model", self.model, "--epochs", spec["epochs"],
                "--batch-size", spec["batch_size"], "--steps", spec["steps"], "--device", self.device,
                "--seed", 0, "--out", out, "--quiet"]
        for key in ("train_size", "test_size"):
            if spec.get(key):
                args += [f"--{key.replace('_', '-')}", spec[key]]
        return args + list(extra)


class Stage:
    """One stage's JSON record, rewritten after every step."""

    def __init__(self, name: str, out: Path, work: Path, settings: Settings, budget: Budget,
                 only: set[str] | None = None):
        self.name, self.out, self.settings, self.budget, self.only = name, out, settings, budget, only
        self.work = work
        self.work.mkdir(parents=True, exist_ok=True)
        self.record = {"stage": name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "tiny": settings.tiny, "device_name": None, "steps": {}, "skipped": {}}
        self.path = out / f"{name}.json"
        self.save()

    def save(self) -> None:
        write_json(self.path, self.record)

    def can_start(self, step: str, minimum: float | None = None) -> bool:
        minimum = self.settings.min_step_s if minimum is None else minimum
        if self.only is not None and step not in self.only:
            self.record["skipped"][step] = "not selected (--only)"
            self.save()
            return False
        if self.budget.left() < minimum:
            self.record["skipped"][step] = f"{self.budget.left():.0f} s left of the budget, under this step's {minimum:.0f} s"
            print(f"  skipped {step}: {self.record['skipped'][step]}", flush=True)
            self.save()
            return False
        print(f"{self.name}: {step} ({self.budget.left():.0f} s left)", flush=True)
        return True

    def done(self, step: str, result: dict) -> dict:
        self.record["steps"][step] = result
        self.save()
        return result


# --------------------------------------------------------------------------- stages
def compile_summary(runs: dict) -> dict:
    """Epoch times of the eager and --compile runs (bench_train --full-epoch), and what they imply."""
    epochs = {}
    for label, run in runs.items():
        full = ((run.get("benchmark") or {}).get("full_epoch") or {}).get("pgd-at")
        epochs[label] = full["epochs"] if full else None
    if not all(epochs.values()):
        return {"epoch_seconds": None}
    total = {k: [e["epoch_total"] for e in v] for k, v in epochs.items()}
    train = {k: [e["train"] for e in v] for k, v in epochs.items()}
    evaluation = {k: [e["eval_test"] + e["eval_train"] for e in v] for k, v in epochs.items()}
    steady = {k: statistics.median(v[1:]) if len(v) > 1 else v[0] for k, v in total.items()}
    saving = steady["eager"] - steady["compile"]
    overhead = total["compile"][0] - total["eager"][0]  # compilation (and recording) in epoch 1
    return {"epoch_seconds": total, "train_seconds": train, "evaluation_seconds": evaluation,
            "steady_epoch_seconds": steady, "steady_epoch_speedup": steady["eager"] / steady["compile"],
            "last_epoch_speedup": total["eager"][-1] / total["compile"][-1],
            "first_epoch_extra_seconds": overhead,
            # epochs after which --compile has saved its first epoch's extra time (None: it never does)
            "break_even_epochs": 1 + overhead / saving if saving > 0 else None,
            "what": "epoch_seconds: whole epochs of Trainer.fit (training with the smaller last batch, per-epoch "
                    "evaluation, checkpoints); steady: the median of epochs 2 and later"}


def stage_runtime(stage: Stage) -> None:
    """Issue 21, items 3 and 4 first, then item 1's GPU check: the lease's first minutes."""
    s = stage.settings
    stage.record["device_name"] = environment().get("device_name")
    bench = [sys.executable, "-P", str(ROOT / "benchmarks" / "bench_train.py"), "--device", s.device, *s.bench_data]
    if stage.can_start("train_compile_vs_eager", s.compile_check_min_s):
        # Does --compile pay in a real run: epochs with a smaller last batch and the per-epoch evaluation,
        # over enough epochs to see the steady state and the break-even point?
        runs = {}
        for label, extra in (("eager", []), ("compile", ["--compile"])):
            path = stage.work / f"full-epoch-{label}.json"
            fast = ["--bf16", "--channels-last"] if not s.tiny else []
            result = run([*bench, *s.compile_check, *fast, *extra, "--full-epoch", "--skip-compare", "--methods",
                          "pgd-at", "--note", f"benchmarks/gpu/suite.py runtime (train_compile_vs_eager, {label})",
                          "--output", str(path)], cwd=ROOT, timeout=stage.budget.left())
            result["benchmark"] = json.loads(path.read_text()) if path.exists() else None
            runs[label] = result
        stage.done("train_compile_vs_eager", {"runs": runs, **compile_summary(runs)})
    if stage.can_start("concurrency", s.concurrency_min_s):
        path = stage.work / "concurrency.json"
        left = stage.budget.left()
        result = run([sys.executable, "-P", str(ROOT / "benchmarks" / "concurrency.py"), "--device", s.device,
                      *s.bench_data, *s.concurrency, "--budget-s", str(max(left - 15, 1)),
                      "--note", "benchmarks/gpu/suite.py runtime (concurrency)", "--output", str(path)],
                     cwd=ROOT, timeout=left)
        result["benchmark"] = json.loads(path.read_text()) if path.exists() else None
        stage.done("concurrency", result)
    if stage.can_start("attack_grads"):
        path = stage.work / "attack-grads.json"
        result = run([sys.executable, "-P", str(ROOT / "benchmarks" / "attack_grads.py"), "--device", s.device,
                      *s.bench_data, *s.attack_grads, "--note", "benchmarks/gpu/suite.py runtime (attack_grads)",
                      "--output", str(path)], cwd=ROOT, timeout=stage.budget.left())
        result["benchmark"] = json.loads(path.read_text()) if path.exists() else None
        stage.done("attack_grads", result)


def stage_check(stage: Stage) -> None:
    s, work = stage.settings, stage.work
    env = environment()
    stage.record["device_name"] = env.get("device_name")
    stage.done("environment", env)

    if stage.can_start("cuda_tests", 20):
        # CUDA-only tests (marked `cuda`; they skip on a CPU). -P: test the installed package.
        result = run([sys.executable, "-P", "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                      str(ROOT / "tests")], cwd=ROOT, timeout=stage.budget.left())
        stage.done("cuda_tests", result)

    if stage.can_start("bf16_agreement"):
        runs = {}
        for label, extra in (("fp32", []), ("bf16_channels_last", ["--bf16", "--channels-last"])):
            result = at_mem(*s.train_args("pgd-at", work / f"agree-{label}", s.agree, *extra),
                            cwd=work, timeout=stage.budget.left())
            result["metrics"] = read_metrics(work / f"agree-{label}")
            runs[label] = result
        a, b = (runs[k]["metrics"][-1] if runs[k]["metrics"] else {} for k in runs)
        keys = ("train_loss", "train_robust_acc", "test_clean_acc", "test_robust_acc")
        diff = {k: b[k] - a[k] for k in keys if isinstance(a.get(k), (int, float)) and isinstance(b.get(k), (int, float))}
        # Same initial weights and batches; the trajectories differ by rounding, which SGD amplifies,
        # so agreement means statistics within a few points, not equal weights.
        agree = bool(diff) and all(abs(diff[k]) <= 0.05 for k in keys[1:] if k in diff)
        stage.done("bf16_agreement", {"runs": runs, "difference_bf16_minus_fp32": diff, "agree_within_5_points": agree,
                                      "speedup_train_seconds": (a.get("train_seconds") or 0) / b["train_seconds"]
                                      if b.get("train_seconds") else None})

    for method in (*METHODS, *PLUGIN_METHODS):
        step = f"two_epochs_{method}"
        if not stage.can_start(step):
            continue
        out = work / f"method-{method}"
        result = at_mem(*s.train_args(method, out, s.methods, "--bf16", "--channels-last"), cwd=work,
                        timeout=stage.budget.left())
        result["metrics"] = read_metrics(out)
        stage.done(step, result)

    if stage.can_start("evaluate_all", 30) and (work / "method-pgd-at" / "last.pt").exists():
        attacks = [a for attack in s.eval_attacks for a in ("--attack", attack)]
        result = at_mem("evaluate", work / "method-pgd-at", "--checkpoints", "last", *attacks,
                        "--n-examples", s.eval_n, "--device", s.device, "--batch-size", 1000,
                        cwd=work, timeout=stage.budget.left())
        evaluation = work / "method-pgd-at" / "eval" / "last.json"
        result["evaluation"] = json.loads(evaluation.read_text()) if evaluation.exists() else None
        stage.done("evaluate_all", result)


def stage_profile(stage: Stage) -> None:
    s = stage.settings
    stage.record["device_name"] = environment().get("device_name")
    if not stage.can_start("profile_pgd-at"):
        return
    path = stage.work / "profile-pgd-at.json"
    result = run([sys.executable, "-P", str(ROOT / "benchmarks" / "profile_step.py"), "--device", s.device,
                  *s.bench_data, *s.profile, "--output", str(path)], cwd=ROOT, timeout=stage.budget.left())
    result["profile"] = json.loads(path.read_text()) if path.exists() else None
    stage.done("profile_pgd-at", result)


def stage_speed(stage: Stage) -> None:
    s = stage.settings
    stage.record["device_name"] = environment().get("device_name")
    bench = [sys.executable, "-P", str(ROOT / "benchmarks" / "bench_train.py"), "--device", s.device, *s.bench_data,
             *s.bench]
    variants = [("fp32", []),
                ("bf16_channels_last", ["--bf16", "--channels-last", "--epoch-estimate", *s.estimate])]
    if s.compile_methods:
        variants.append(("bf16_channels_last_compile",
                         ["--bf16", "--channels-last", "--compile", "--methods", *s.compile_methods]))
    for label, extra in variants:
        if not stage.can_start(label):
            continue
        path = stage.work / f"bench-{label}.json"
        result = run([*bench, *extra, "--note", f"benchmarks/gpu/suite.py speed ({label})", "--output", str(path)],
                     cwd=ROOT, timeout=stage.budget.left())
        result["benchmark"] = json.loads(path.read_text()) if path.exists() else None
        stage.done(label, result)
    stage.record["summary"] = speed_summary(stage.record["steps"])
    stage.save()


def speed_summary(steps: dict) -> dict:
    """images/s per method and variant, with the reference measured in the same run, in one table."""
    table = {}
    for label, step in steps.items():
        for method, row in ((step.get("benchmark") or {}).get("methods") or {}).items():
            table.setdefault(method, {})[label] = row.get("package_images_per_s")
            table[method].setdefault("reference_fp32", row.get("reference_images_per_s"))
    estimates = [{k: row[k] for k in ("model", "batch_size", "images_per_s", "seconds_per_cifar10_epoch",
                                      "mfu_vs_bf16_peak")}
                 for step in steps.values() for row in ((step.get("benchmark") or {}).get("epoch_estimate") or [])]
    return {"images_per_s": table, "epoch_estimate": estimates}


def stage_reproduce(stage: Stage) -> None:
    """``at-mem reproduce`` with the suite's plan (configs/plans/gpu-suite-cifar10.toml; --tiny:
    smoke-mnist.toml), two runs at a time on the one device. A time limit ends it with SIGTERM, so
    the runs save their checkpoints and a later call of the stage in the same lease resumes them."""
    s, work = stage.settings, stage.work
    stage.record["device_name"] = environment().get("device_name")
    if not stage.can_start("reproduce"):
        return
    # Absolute: the command runs in `work`, and a relative --out/--work would then nest.
    out = (work / "reproduce").resolve()
    data_dir = str(Path(s.data[s.data.index("--data-dir") + 1]).resolve())
    limit = max(1, int(stage.budget.left() - 20))
    # timeout: SIGTERM at the limit (reproduce stops every run with a checkpoint), SIGKILL 15 s later.
    command = ["timeout", "-k", "15", str(limit), sys.executable, "-P", "-m", "at_memorization", "reproduce",
               str(s.reproduce_plan), "--out", str(out), "--jobs", "2", "--device", s.device, "--data-dir", data_dir]
    result = run(command, cwd=work, timeout=limit + 30)
    status = json.loads((out / "status.json").read_text()) if (out / "status.json").exists() else {}
    result.update(plan=str(s.reproduce_plan.relative_to(ROOT)), status=status,
                  runs={run_dir.name: read_metrics(run_dir) for run_dir in sorted((out / "runs").glob("*"))
                        if run_dir.is_dir()})
    for name in ("report.json",):
        if (out / name).exists():
            result[name.split(".")[0]] = json.loads((out / name).read_text())
    stage.done("reproduce", result)
    pack_runs(stage.out / "runs.tar.gz", out)


def pack_runs(path: Path, study: Path) -> None:
    """The study's records (not the checkpoints: they are too large to come back) as one archive:
    README.md, report.md/json, status.json, logs, and each run's config.json, metrics.jsonl, eval/."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tarfile.open(tmp, "w:gz") as archive:
        if study.is_dir():
            for file in sorted(study.rglob("*")):
                if file.is_file() and file.suffix in (".json", ".jsonl", ".log", ".txt", ".md", ".toml", ".png"):
                    archive.add(file, arcname=str(Path(study.name) / file.relative_to(study)))
    os.replace(tmp, path)


STAGE_FUNCTIONS = {"runtime": stage_runtime, "check": stage_check, "profile": stage_profile, "speed": stage_speed, "reproduce": stage_reproduce}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", help=f"one of {', '.join(STAGES)}, several joined by commas, or all")
    parser.add_argument("--out", required=True, help="folder for <stage>.json, runs.tar.gz and scratch runs")
    parser.add_argument("--work", help="folder for the runs and checkpoints (default OUT/work; on the device keep it "
                                       "outside the folder that comes back)")
    parser.add_argument("--cifar-dir", help="the CIFAR-10 JPEG image folder (DIR/train/<class>/*.jpg)")
    parser.add_argument("--budget-s", type=float, default=540.0, help="seconds for everything (default 540)")
    parser.add_argument("--device", help="default: cuda, or cpu with --tiny (full settings on a CPU take hours)")
    parser.add_argument("--tiny", action="store_true", help="CPU, MNIST, a small CNN, a few images: a dry run")
    parser.add_argument("--only", help="run just these steps (comma-separated names as in the JSON's steps)")
    args = parser.parse_args(argv)
    stages = STAGES if args.stage == "all" else tuple(args.stage.split(","))
    unknown = [name for name in stages if name not in STAGES]
    if unknown:
        parser.error(f"unknown stage {', '.join(unknown)}; choose from {', '.join(STAGES)} or all")
    only = set(args.only.split(",")) if args.only else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = Settings(args.tiny, args.cifar_dir, args.device)
    if settings.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("error: no CUDA device; use --tiny for a CPU dry run", file=sys.stderr)
            return 2
    budget = Budget(args.budget_s)
    failed = []
    for name in stages:
        stage = Stage(name, out, Path(args.work) if args.work else out / "work", settings, budget, only)
        try:
            STAGE_FUNCTIONS[name](stage)
        except Exception as error:  # record it and go on: a later stage may still work
            stage.record["error"] = f"{type(error).__name__}: {error}"
            stage.save()
        failed += [f"{name}:{step}" for step, result in stage.record["steps"].items()
                   if isinstance(result, dict) and result.get("ok") is False]
        if "error" in stage.record:
            failed.append(f"{name}: {stage.record['error']}")
        print(f"{name}: wrote {stage.path}", flush=True)
    print("failed: " + (", ".join(failed) if failed else "nothing"), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
