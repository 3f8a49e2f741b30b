"""The run folder's files that are written when training starts: for a new run its settings,
initial weights and labels; for a resumed one the repaired metrics, the rewritten settings and the
history events that the start decided (``start.Start``)."""

from __future__ import annotations

import torch

from .. import checkpoint as ckpt
from ..data import DataBundle
from ..runfolder import RunFolder, RunFolderError
from .start import Start


def config_document(start: Start, method_settings: dict, world_size: int, device, fingerprint: str | None) -> dict:
    """config.json: the settings (run and method, resolved), which were derived, and the run's place."""
    return {"config": start.config.to_dict(), "method": dict(method_settings), "derived": list(start.derived),
            "world_size": world_size, "device": str(device), "data_fingerprint": fingerprint}


def write_new_run(folder: RunFolder, document: dict, model: torch.nn.Module, data: DataBundle) -> None:
    """Files written once at the start: settings, initial weights, the (possibly noisy) labels."""
    folder.remove_stale_temporaries()  # e.g. of a run killed before its first checkpoint
    folder.write_config(document)
    ckpt.save_atomic(ckpt.cpu_state_dict(model), folder.init)
    ckpt.save_atomic({"labels": data.train.labels, "clean_labels": data.clean_train_labels}, folder.labels)
    folder.start_metrics()


def record_resume(folder: RunFolder, start: Start, document: dict, history: list[dict]) -> None:
    """A resume takes effect: metrics.jsonl may hold an epoch written after the last checkpoint (it is
    rewritten from the checkpoint's history), config.json is rewritten if the start changed it, and
    the start's events are recorded."""
    folder.remove_stale_temporaries()
    folder.rewrite_metrics(history)
    if start.rewrite_config:
        folder.write_config(document)
    for event, details in start.events:
        folder.record_event(event, **details)


def repair_metrics(folder: RunFolder, history: list[dict]) -> bool:
    """Rewrite metrics.jsonl from the checkpoint's history (the record) when it lacks epochs the
    history holds, or cannot be read; True when it was rewritten."""
    try:
        recorded = [r.get("epoch") for r in folder.read_metrics(allow_empty=True)]
    except RunFolderError:  # unreadable: rewritten from the history
        recorded = None
    if recorded == [h.get("epoch") for h in history]:
        return False
    folder.rewrite_metrics(history)
    return True
