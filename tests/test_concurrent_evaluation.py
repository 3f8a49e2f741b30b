"""Two evaluations of one run at once (two ``at-mem evaluate RUN``) each keep their results (issue 33,
item 1): the eval record is merged under a lock with the file as it is then, not as it was read
before minutes of attacks."""

import json
import threading

from at_memorization import run_evaluation
from at_memorization.run_evaluation import EvaluationOptions, evaluate_run
from at_memorization.training import RunConfig, Trainer


def test_two_evaluations_at_once_keep_both_results(mnist_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    config = RunConfig(method="pgd-at", dataset="mnist", data_dir=str(mnist_dir), model="smallcnn", epochs=1,
                       batch_size=32, train_size=64, test_size=16, steps=1, eval_steps=1, eps=0.1, step_size=0.05)
    Trainer(config, run, device="cpu").fit()

    # Both calls have read eval/last.json (absent) and measured before either writes: the interleaving
    # that lost one call's results when the merge used what was read at the start.
    both_measured = threading.Barrier(2, timeout=120)
    real_evaluate = run_evaluation.evaluate_checkpoint

    def evaluate_then_wait(*args, **kwargs):
        record = real_evaluate(*args, **kwargs)
        both_measured.wait()
        return record

    monkeypatch.setattr(run_evaluation, "evaluate_checkpoint", evaluate_then_wait)
    errors = []

    def evaluate(attack):
        try:
            evaluate_run(run, EvaluationOptions((attack,), n_examples=16, device="cpu"), ("last",))
        except Exception as error:  # noqa: BLE001  (reported by the assertion below)
            errors.append(error)

    threads = [threading.Thread(target=evaluate, args=(attack,)) for attack in ("clean", "pgd20")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    record = json.loads((run / "eval" / "last.json").read_text())
    assert {"clean_acc", "pgd20_acc"} <= set(record), record
    assert record["n_examples_by_attack"] == {"clean": 16, "pgd20": 16}
