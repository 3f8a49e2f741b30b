"""``--track-samples``: each training sample's adversarial correctness and loss at every epoch
(``tracking.pt``), recorded on the device during an epoch and copied to the host once at its end."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from .. import checkpoint as ckpt
from ..runtime import DistributedContext, TrainingError, eval_mode

KEYS = ("adv_correct", "adv_loss")


class SampleTracker:
    """The records of ``epochs`` x ``num_samples``; ``recorded`` says which epochs hold real ones (a
    lost tracking.pt leaves earlier epochs unrecorded)."""

    def __init__(self, epochs: int, num_samples: int, ctx: DistributedContext):
        self.ctx = ctx
        self.tracked = {"adv_correct": torch.zeros(epochs, num_samples, dtype=torch.uint8),
                        "adv_loss": torch.zeros(epochs, num_samples, dtype=torch.float16),
                        "recorded": torch.zeros(epochs, dtype=torch.uint8)}
        self.epoch_records: dict[str, torch.Tensor] = {}

    def begin_epoch(self, epoch: int, partial_records: dict | None) -> None:
        """The epoch's rows on the device (from a mid-epoch checkpoint's records when resuming one)."""
        if partial_records is not None:
            self.epoch_records = {k: v.to(self.ctx.device) for k, v in partial_records.items()}
        else:
            self.epoch_records = {k: self.tracked[k][epoch - 1].to(self.ctx.device) for k in KEYS}

    def record(self, model: torch.nn.Module, autocast, x_adv, y, index) -> None:
        """Per-sample adversarial correctness and loss (eval mode) on this step's examples."""
        with eval_mode(model), torch.no_grad(), autocast():
            logits = model(x_adv).float()
        correct = (logits.argmax(1) == y).to(torch.uint8)
        losses = torch.nn.functional.cross_entropy(logits, y, reduction="none").to(torch.float16)
        if self.ctx.enabled:
            gathered = [[torch.empty_like(t) for _ in range(self.ctx.world_size)] for t in (index, correct, losses)]
            for out, t in zip(gathered, (index, correct, losses)):
                dist.all_gather(out, t)
            index, correct, losses = (torch.cat(g) for g in gathered)
        # Written on the device; copied to the host once per epoch (no sync per step).
        self.epoch_records["adv_correct"][index] = correct
        self.epoch_records["adv_loss"][index] = losses

    def end_epoch(self, epoch: int) -> None:
        for key, values in self.epoch_records.items():
            self.tracked[key][epoch - 1] = values.cpu()
        self.tracked["recorded"][epoch - 1] = 1

    def partial_records(self) -> dict:
        """The unfinished epoch's records, for a mid-epoch checkpoint."""
        return {k: v.cpu() for k, v in self.epoch_records.items()}

    def restore(self, path: Path, done: int, log: Callable[[str], None]) -> list[tuple[str, dict]]:
        """The records of the ``done`` finished epochs from ``path``; returns history events."""
        if not path.is_file():
            if done > 0:
                log(f"warning: {path} is missing: the per-sample records of epochs 1-{done} are lost and "
                    f"marked as not recorded (at-mem memorization will refuse this run)")
                return [("tracking-lost", {"epochs": [1, done]})]
            return []
        try:
            # any number of epochs: the file may be from before or after an --override epochs=N
            saved = ckpt.load_tracking(path, None, self.tracked["adv_correct"].shape[1])
        except ckpt.CheckpointError as error:
            raise TrainingError(f"--resume: {error}; delete it to resume without the per-sample records of "
                                f"epochs 1-{done}") from None
        saved_epochs = saved["adv_correct"].shape[0]
        recorded = saved.get("recorded")
        if not isinstance(recorded, torch.Tensor):
            # a file from before the "recorded" flag: every finished epoch was recorded
            recorded = (torch.arange(saved_epochs) < done).to(torch.uint8)
        # epochs after the checkpoint's are trained again (the file may have been written for a
        # checkpoint that never made it to disk)
        saved["recorded"] = recorded.to(torch.uint8) * (torch.arange(saved_epochs) < done)
        # An extended (or shortened) run: its rows grow (or go) with the epochs; new ones unrecorded.
        rows = min(saved_epochs, self.tracked["recorded"].shape[0])
        for key, values in saved.items():
            self.tracked[key][:rows] = values[:rows]
        return []
