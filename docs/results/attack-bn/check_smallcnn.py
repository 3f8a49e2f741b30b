"""The committed MNIST study setting (smallcnn, --drop-rate 0) for 2 of its 40 epochs: pgd-at with
--attack-bn eval must reproduce docs/results/evidence/runs/pgd-at-s0's first 2 records exactly, and,
smallcnn having neither BatchNorm nor (at drop rate 0) dropout, --attack-bn train must give the same
records as eval, for pgd-at and pgd-at-awp. Writes check-smallcnn.json next to this file."""
import json, shutil, sys, tempfile
from pathlib import Path

from at_memorization.training import Callbacks, RunConfig, Trainer, TrainingInterrupted

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
COMMITTED = ROOT / "docs/results/evidence/runs/pgd-at-s0/metrics.jsonl"
SETTING = dict(dataset="mnist", data_dir=str(ROOT.parent / "shared/data/mnist"), model="smallcnn", drop_rate=0.0,
               label_noise=0.4, train_size=500, test_size=500, eval_train_size=250, batch_size=32, lr=0.05,
               epochs=40, eps=0.1, step_size=0.04, steps=3, eval_steps=10, track_samples=True, seed=0)
DROP = ("train_seconds",)


def first_two(method, attack_bn):
    out = Path(tempfile.mkdtemp()) / "run"
    holder = {}

    def stop(record):
        if record["epoch"] == 2:
            holder["t"].request_stop("check")

    holder["t"] = Trainer(RunConfig(method=method, attack_bn=attack_bn, **SETTING), out, device="cpu",
                          callbacks=Callbacks(epoch_end=stop))
    try:
        holder["t"].fit()
    except TrainingInterrupted:
        pass
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out.parent)
    return [{k: v for k, v in r.items() if k not in DROP} for r in records]


committed = [{k: v for k, v in json.loads(line).items() if k not in DROP}
             for line in COMMITTED.read_text().splitlines()[:2]]
result = {"committed pgd-at-s0": committed}
for method in ("pgd-at", "pgd-at-awp"):
    for mode in ("eval", "train"):
        result[f"{method} {mode}"] = first_two(method, mode)
result["pgd-at eval == committed"] = result["pgd-at eval"] == committed
result["pgd-at train == eval"] = result["pgd-at train"] == result["pgd-at eval"]
result["pgd-at-awp train == eval"] = result["pgd-at-awp train"] == result["pgd-at-awp eval"]
(HERE / "check-smallcnn.json").write_text(json.dumps(result, indent=1) + "\n")
print(json.dumps({k: v for k, v in result.items() if "==" in k}))
