#!/usr/bin/env python
"""Issue 21, item 5: the per-epoch evaluation with its set-up made once per run, against the former
code that made it at every epoch, timed alternately in one run on the same trained model.

``current``: ``Trainer.evaluate_epoch`` (the evaluation sets as float tensors on the device and the
PGD attack object are made on the first call and reused). ``former``: the code before issue 21,
copied here (``former_evaluate_epoch``): every epoch it gathered each split's uint8 images, built
the attack, and converted every batch to float and to the device twice (clean and PGD passes).
Both compute the same accuracies; the script checks that they are equal.

    python benchmarks/eval_setup.py --device cpu --dataset mnist --data-dir ../shared/data/mnist \\
        --model smallcnn --batch-size 32 --steps 3 --eps 0.1 --step-size 0.04 --train-size 500 \\
        --test-size 500 --eval-train-size 250 --eval-steps 10 --threads 1 --output out.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import add_run_arguments, device_name, sync, versions  # noqa: E402

from at_memorization.attacks import selection_pgd  # noqa: E402
from at_memorization.data import load_data  # noqa: E402
from at_memorization.evaluation import correct_flags, default_batch_size  # noqa: E402
from at_memorization.training import RunConfig, Trainer  # noqa: E402


def former_evaluate_epoch(trainer: Trainer, record: dict) -> None:
    """``Trainer.evaluate_epoch`` before issue 21, verbatim but for ``self`` -> ``trainer``."""
    config = trainer.config
    attack = selection_pgd(trainer.model, config.eps, config.step_size, config.eval_steps, config.norm)
    splits = [("test", trainer.data.test, len(trainer.data.test))]
    if config.eval_train_size:
        splits.append(("train", trainer.data.train, min(config.eval_train_size, len(trainer.data.train))))
    for prefix, dataset, n in splits:
        images, labels, _ = dataset.batch(trainer.evaluator.shard(n))
        counts = []
        for attack_or_none in (None, attack):
            flags = correct_flags(trainer.model, images, labels, batch_size=default_batch_size(trainer.ctx.device),
                                  device=trainer.ctx.device, attack=attack_or_none, seed=config.seed)
            counts.append(flags.sum())
        counts = trainer.ctx.all_reduce_sum(torch.stack(counts).float().to(trainer.ctx.device)).cpu().tolist()
        record[f"{prefix}_clean_acc"] = counts[0] / n
        record[f"{prefix}_robust_acc"] = counts[1] / n


def batch_size_effect(trainer: Trainer, sizes: list[int], repeats: int, device) -> dict:
    """The test split's PGD pass at other batch sizes: seconds (fastest of ``repeats``, alternated with
    the default size) and whether the adversarial inputs and the per-point results equal the default's."""
    from at_memorization.randomness import isolated_rng
    from at_memorization.runtime import eval_mode

    config = trainer.config
    images, labels, _ = trainer.evaluator.evaluation_set("test")
    attack = selection_pgd(trainer.model, config.eps, config.step_size, config.eval_steps, config.norm)
    default = default_batch_size(device)

    def adversarial(batch_size):
        outputs = []
        with eval_mode(trainer.model), isolated_rng(config.seed):  # as correct_flags runs the attack
            for start in range(0, len(labels), batch_size):
                outputs.append(attack(images[start:start + batch_size], labels[start:start + batch_size]))
        return torch.cat(outputs)

    timings = {size: [] for size in [default, *sizes]}
    results = {}
    for _ in range(repeats):
        for size in timings:
            sync(device)
            start = time.perf_counter()
            results[size] = adversarial(size)
            sync(device)
            timings[size].append(time.perf_counter() - start)
    with torch.no_grad(), eval_mode(trainer.model):
        flags = {size: (trainer.model(x).argmax(1) == labels) for size, x in results.items()}
    return {"default": default, "seconds": {str(k): v for k, v in timings.items()},
            "fastest_vs_default": {str(k): min(v) / min(timings[default]) for k, v in timings.items()},
            "adversarial_inputs_identical": {str(k): bool(torch.equal(results[k], results[default])) for k in timings},
            "images_differing": {str(k): int((results[k] != results[default]).flatten(1).any(1).sum()) for k in timings},
            "robust_points_identical": {str(k): bool(torch.equal(flags[k], flags[default])) for k in timings}}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--method", default="pgd-at")
    parser.add_argument("--train-size", type=int, default=500)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--eval-train-size", type=int, default=250)
    parser.add_argument("--eval-steps", type=int, default=10)
    parser.add_argument("--train-epochs", type=int, default=1, help="epochs trained before timing (a real model)")
    parser.add_argument("--repeats", type=int, default=5, help="timed evaluations per side, alternated")
    parser.add_argument("--batch-sizes", nargs="*", type=int, default=[],
                        help="also time the test split's PGD evaluation at these batch sizes against the default "
                             "(256 on a CPU, 1024 on a GPU) and say whether the adversarial inputs are bit-identical")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--note", default="")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_data(args.dataset, args.data_dir, train_size=args.train_size, test_size=args.test_size)
    config = RunConfig(method=args.method, dataset=args.dataset, model=args.model, epochs=args.train_epochs,
                       batch_size=args.batch_size, steps=args.steps, eps=args.eps, step_size=args.step_size,
                       eval_steps=args.eval_steps, eval_train_size=args.eval_train_size, lr=0.05, seed=0)
    trainer = Trainer(config, Path(tempfile.mkdtemp(prefix="eval-setup-")) / "run", device=str(device), data=data)
    try:
        for epoch in range(1, args.train_epochs + 1):
            trainer.train_epoch(epoch)
        sides = {"current": trainer.evaluate_epoch, "former": lambda record: former_evaluate_epoch(trainer, record)}
        records = {side: [] for side in sides}
        seconds = {side: [] for side in sides}
        for side, evaluate in sides.items():  # warm-up; the current side makes its sets and attack here
            evaluate({})
        for _ in range(args.repeats):
            for side, evaluate in sides.items():
                record = {}
                sync(device)
                start = time.perf_counter()
                evaluate(record)
                sync(device)
                seconds[side].append(time.perf_counter() - start)
                records[side].append(record)
        batch_sizes = batch_size_effect(trainer, args.batch_sizes, args.repeats, device) if args.batch_sizes else None
    finally:
        trainer.close()
    identical = all(a == b for a, b in zip(records["current"], records["former"]))
    report = {"benchmark": "eval_setup", "date": datetime.date.today().isoformat(), "device": str(device),
              "device_name": device_name(device), "cpu_count": os.cpu_count(),
              "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,
              "load_average_end": os.getloadavg(), "versions": versions(),
              "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              "note": args.note, "settings": {k: (str(v) if isinstance(v, torch.device) else v)
                                              for k, v in vars(args).items() if k not in ("output", "note")},
              "seconds": seconds, "records": records, "identical_accuracies": identical,
              "fastest": {side: min(v) for side, v in seconds.items()},
              "median": {side: statistics.median(v) for side, v in seconds.items()},
              "batch_sizes": batch_sizes,
              "ratio_former_over_current": min(seconds["former"]) / min(seconds["current"]),
              "ratio_former_over_current_median": statistics.median(seconds["former"]) / statistics.median(seconds["current"])}
    print(f"evaluation: current {report['fastest']['current']:.3f} s, former {report['fastest']['former']:.3f} s "
          f"(fastest of {args.repeats}; former/current x{report['ratio_former_over_current']:.3f}, median "
          f"x{report['ratio_former_over_current_median']:.3f}); accuracies identical: {identical}", flush=True)
    if batch_sizes:
        print("batch sizes (PGD pass on the test split, time vs the default, bit-identical adversarial inputs): "
              + ", ".join(f"{k}: x{v:.2f} {'identical' if batch_sizes['adversarial_inputs_identical'][k] else 'DIFFERENT'}"
                          for k, v in batch_sizes["fastest_vs_default"].items()), flush=True)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
