"""AutoAttack through ``robustbench.eval.benchmark`` itself (the path used with official CIFAR files).

The official CIFAR-10 batches cannot be had offline here, so the test feeds robustbench's own
``benchmark`` the exact-pixel CIFAR-10 test images from ../shared/data through its data hook; the
attack, the adapter to pyautoattack 0.2 and the accuracy bookkeeping are robustbench's real code.
"""

import numpy as np
import torch

from at_memorization import evaluation
from at_memorization._compat import import_robustbench


def _cifar_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10)).eval()


def test_benchmark_runs_with_the_pyautoattack_adapter(cifar_exact_npz, monkeypatch, tmp_path):
    data = np.load(cifar_exact_npz)
    x = torch.from_numpy(data["x_test"][:12]).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(data["y_test"][:12].astype(np.int64))
    rb_eval = import_robustbench("eval")
    requested = {}

    def fake_clean_dataset(dataset, n_examples, data_dir, prepr):
        requested.update(dataset=dataset.value, n_examples=n_examples, data_dir=data_dir)
        return x[:n_examples].float() / 255, y[:n_examples]

    monkeypatch.setattr(rb_eval, "load_clean_dataset", fake_clean_dataset)
    monkeypatch.setattr(evaluation, "official_files_present", lambda dataset, data_dir: dataset == "cifar10")
    model = _cifar_model()
    results = evaluation.evaluate(model, x, y, attacks=("clean", "autoattack"), eps=8 / 255, device="cpu",
                                  batch_size=12, dataset="cifar10", data_dir=str(tmp_path))
    assert results["autoattack_protocol"] == "robustbench.eval.benchmark"
    assert requested == {"dataset": "cifar10", "n_examples": 12, "data_dir": str(tmp_path)}
    clean = evaluation.accuracy(model, x, y, batch_size=12)
    assert results["clean_acc"] == clean
    assert 0.0 <= results["autoattack_acc"] <= clean
    # The other data sets take pyautoattack directly, with the same attack.
    direct = evaluation.evaluate(model, x, y, attacks=("autoattack",), eps=8 / 255, device="cpu", batch_size=12,
                                 dataset="imagefolder", data_dir=str(tmp_path))
    assert direct["autoattack_protocol"].startswith("pyautoattack")
    assert 0.0 <= direct["autoattack_acc"] <= clean


def test_official_files_are_detected_by_their_checksums(tmp_path):
    assert not evaluation.official_files_present("cifar10", tmp_path)
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"not the real file")
    assert not evaluation.official_files_present("cifar10", tmp_path)
    assert not evaluation.official_files_present("mnist", tmp_path)
