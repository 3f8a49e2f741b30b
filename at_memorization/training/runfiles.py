"""The run folder's files that training writes besides its epochs' lines: for a new run its settings,
initial weights and labels; for a resumed one the repaired metrics and config.json when it starts, then
the settings it changed and the history events that the start decided (``start.Start``) with its
first checkpoint; and the files of a checkpoint, in their order."""

from __future__ import annotations

import torch

from .. import checkpoint as ckpt
from ..data import DataBundle
from ..runfolder import RunFolder, RunFolderError
from .start import Start


def config_document(start: Start, method_settings: dict, world_size: int, device, fingerprint: str | None) -> dict:
    """config.json: the settings (run and method, resolved), which were derived, and the run's place."""
    return {"config": {**start.config.to_dict(), "method_args": dict(method_settings)}, "method": dict(method_settings),
            "derived": list(start.derived), "world_size": world_size, "device": str(device),
            "data_fingerprint": fingerprint}


def write_new_run(folder: RunFolder, document: dict, model: torch.nn.Module, data: DataBundle) -> None:
    """Files written once at the start: settings, initial weights, the (possibly noisy) labels."""
    folder.remove_stale_temporaries()  # e.g. of a run killed before its first checkpoint
    folder.write_config(document)
    ckpt.save_atomic(ckpt.cpu_state_dict(model), folder.init)
    ckpt.save_atomic({"labels": data.train.labels, "clean_labels": data.clean_train_labels}, folder.labels)
    folder.start_metrics()


def record_resume(folder: RunFolder, start: Start, document: dict, history: list[dict]) -> None:
    """A resume begins: metrics.jsonl may hold an epoch written after the last checkpoint (it is
    rewritten from the checkpoint's history), and an unreadable config.json is rewritten from the
    checkpoint. What the resume changes is written with its first checkpoint (``ResumeRecords``)."""
    folder.remove_stale_temporaries()
    folder.rewrite_metrics(history)
    repair_config(folder, start, document)


def repair_config(folder: RunFolder, start: Start, document: dict) -> bool:
    """config.json could not be read (``Start.resumed``): rewrite it with the checkpoint's settings,
    which are the run's until a checkpoint holds others. True when it was rewritten."""
    if start.resumable is None or not any(event == "config-repaired" for event, _ in start.events):
        return False
    resumable = start.resumable
    folder.write_config({**document, "config": resumable.saved_config, "method": resumable.saved_method})
    return True


def save_checkpoint(folder: RunFolder, state: dict, what: str, tracker, records: "ResumeRecords", *,
                    best: bool = False) -> None:
    """A checkpoint's files, in their order: the tracking record, ``best.pt`` (``best``), ``last.pt``,
    then a resume's records (with its first checkpoint)."""
    if tracker is not None:
        folder.save_tracking(tracker.tracked)
    if best:
        folder.save_best(state)
    folder.save_last(state, what)
    records.write()


class ResumeRecords:
    """What a resume changes in the run's record (config.json with the settings it continues with, its
    history events): written with the resume's first checkpoint, so that a resume stopped before one
    leaves the folder saying what its checkpoint holds."""

    def __init__(self, folder: RunFolder, start: Start, document: dict):
        self.folder, self.start, self.document = folder, start, document
        self.pending = start.resumable is not None

    def write(self) -> None:
        if not self.pending:
            return
        self.pending = False
        if self.start.rewrite_config:
            self.folder.write_config(self.document)
        for event, details in self.start.events:
            self.folder.record_event(event, **details)


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
