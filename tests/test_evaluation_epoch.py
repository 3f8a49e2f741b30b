"""Issue 21, item 5: the per-epoch evaluation makes its sets and attack once per run, not once per
epoch, and records exactly the accuracies the former code recorded."""

from __future__ import annotations

import torch

from at_memorization.attacks import selection_pgd
from at_memorization.data import load_data
from at_memorization.evaluation import correct_flags, default_batch_size
from at_memorization.training import RunConfig, Trainer


def former_evaluate_epoch(trainer: Trainer, record: dict) -> None:
    """``Trainer.evaluate_epoch`` as it was before issue 21 (set-up repeated at every epoch)."""
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


class ComparedTrainer(Trainer):
    """Records, at every epoch, the accuracies of the former evaluation next to the current one's."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pairs: list[tuple[dict, dict]] = []
        self.attacks: list[object] = []

    def evaluate_epoch(self, record):
        former: dict = {}
        former_evaluate_epoch(self, former)
        super().evaluate_epoch(record)
        self.pairs.append(({k: record[k] for k in former}, former))
        self.attacks.append(self.evaluator.attack)


def test_per_epoch_accuracies_are_those_of_the_former_evaluation(mnist_dir, tmp_path):
    # More test and training points than one CPU evaluation batch (256): several batches per split,
    # a smaller last one, and the random starts drawn across batches as before. L2 and Linf.
    data = load_data("mnist", mnist_dir, train_size=320, test_size=300)
    for norm, eps, step in (("Linf", 0.1, 0.04), ("L2", 1.0, 0.25)):
        config = RunConfig(method="pgd-at", dataset="mnist", model="smallcnn", epochs=3, batch_size=64, steps=2,
                           eval_steps=3, eval_train_size=290, milestones=[2], eps=eps, step_size=step, lr=0.05,
                           norm=norm, seed=0)
        trainer = ComparedTrainer(config, tmp_path / norm, device="cpu", data=data)
        history = trainer.fit()
        assert len(trainer.pairs) == 3
        for current, former in trainer.pairs:
            assert set(current) == {"test_clean_acc", "test_robust_acc", "train_clean_acc", "train_robust_acc"}
            assert current == former  # the same fractions, exactly
        assert history[-1]["test_robust_acc"] > 0  # it measured something
        assert len({id(a) for a in trainer.attacks}) == 1  # one attack object for the run


def test_evaluation_sets_are_made_once_per_run(mnist_dir, tmp_path, monkeypatch):
    data = load_data("mnist", mnist_dir, train_size=64, test_size=40)
    config = RunConfig(method="pgd-at", dataset="mnist", model="smallcnn", epochs=3, batch_size=32, steps=1,
                       eval_steps=1, eval_train_size=20, milestones=[2], eps=0.1, step_size=0.05, lr=0.05, seed=0)
    trainer = Trainer(config, tmp_path / "run", device="cpu", data=data)
    gathered = []
    for dataset in (data.test, data.train):
        real = dataset.batch

        def batch(indices, real=real, dataset=dataset):
            gathered.append(dataset is data.test)
            return real(indices)

        monkeypatch.setattr(dataset, "batch", batch)
    trainer.fit()
    # the training batches are cut from the device-resident copy, so every call here is the evaluation's
    assert sorted(gathered) == [False, True]  # each split gathered once, not once per epoch
