"""Plugins declare the per-epoch values they log (``Method.logged``); core code shows them without
naming one: the method catalog carries the declarations (torch-free, cached), the train command's
epoch line and ``at-mem plot`` read them from there."""

from __future__ import annotations

import re
from pathlib import Path

from at_memorization import method_catalog
from at_memorization.cli import _ProgressCallbacks
from at_memorization.methods.registry import discover
from at_memorization.plugins.awp.awp import AdversarialWeightPerturbation
from at_memorization.plugins.temporal_ensembling import TemporalEnsembling

PACKAGE = Path(method_catalog.__file__).parent


def test_the_catalog_carries_each_methods_declarations_from_the_cache_as_from_the_classes(tmp_path, monkeypatch):
    monkeypatch.setenv("AT_MEM_CACHE_DIR", str(tmp_path))
    built = method_catalog.method_catalog()  # from the classes; writes the file
    assert len(list(tmp_path.glob("methods-*.json"))) == 1
    assert method_catalog.method_catalog() == built  # read back
    by_name = {method.name: method.logged for method in built}
    assert by_name == {name: entry.load().logged for name, entry in discover().items()}
    assert by_name["pgd-at"] == () and by_name["pgd-at-te"] == TemporalEnsembling.logged
    assert by_name["pgd-at-te-awp"] == TemporalEnsembling.logged + AdversarialWeightPerturbation.logged
    assert {value.key for value in method_catalog.logged_values()} == {"te_weight_now", "awp_gamma_now"}


def test_the_epoch_line_shows_the_declared_values_in_the_order_logged(capsys):
    record = {"epoch": 3, "train_loss": 1.5, "te_weight_now": 300.0, "awp_gamma_now": 0.01, "te_loss": 0.2,
              "test_clean_acc": 0.5, "test_robust_acc": 0.25, "train_seconds": 2.0, "grad_norm": 0.75}
    _ProgressCallbacks(quiet=True).epoch_end(record)
    assert capsys.readouterr().out == ("epoch 3: loss 1.5000 test clean 0.5000 robust 0.2500 (2.0s) "
                                       "te_weight_now=300 awp_gamma_now=0.01 grad_norm=0.75\n")


def test_core_code_names_no_plugins_key():
    keys = {key for value in method_catalog.logged_values() for key in (value.key, *value.aliases)}
    assert "te_weight" in keys  # the aliases too
    quoted = re.compile("|".join(rf"[\"']{re.escape(key)}[\"']" for key in keys))
    named = [f"{path.relative_to(PACKAGE)}:{number}" for path in sorted(PACKAGE.rglob("*.py"))
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if quoted.search(line)]
    assert named == []
