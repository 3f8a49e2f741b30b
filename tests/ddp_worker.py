"""Launched by tests/test_distributed.py under ``torchrun --nproc_per_node=2`` (gloo, CPU).

Not a test module itself (no ``test_`` prefix). One launch does three things, so the test pays
torchrun's start-up once:

1. ``te``: every rank feeds its shard of the same global batches to ``TELoss.update`` (with and
   without the trainer's equal-batch fast path); rank 0 writes the largest difference to a
   single-process ``TELoss`` fed the concatenated global batches, and whether all ranks hold the
   same ensemble.
2. ``full``: ``at-mem train`` (the real CLI) for all epochs into ``OUT/full``.
3. ``interrupted``: the same command into ``OUT/interrupted``, stopped after epoch 1 (every rank
   leaves at the same point, after the checkpoint is written), to be resumed by the test.
4. ``midepoch``: the same command with ``--checkpoint-every-steps 1`` into ``OUT/midepoch``, stopped
   in the third step of epoch 1 (its last.pt is of step 2, copied to ``OUT/midepoch-partial.pt``),
   to be resumed by the test.

Every rank records the index batches the trainer drew (``OUT/batches-<run>-rank<r>.json``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def te_check(out: Path) -> None:
    from at_memorization import TELoss
    from at_memorization.data import epoch_batches

    rank, world = dist.get_rank(), dist.get_world_size()
    n, c = 51, 10  # 51 is odd: DistributedSampler pads rank 1's shard with a repeated index
    # The concatenated batches repeat the padded index, and the unequal step below draws indices at
    # random: both repeat samples within a batch on purpose.
    distributed = TELoss(n, c, momentum=0.7, start_epoch=1, end_epoch=3, allow_duplicate_indices=True)
    reference = TELoss(n, c, momentum=0.7, start_epoch=1, end_epoch=3, sync_distributed=False,
                       allow_duplicate_indices=True)
    fast = TELoss(n, c, momentum=0.7, start_epoch=1, end_epoch=3)  # as the trainer's methods set it
    fast.validate, fast.equal_rank_batches = False, True
    step = 0
    for epoch in (1, 2, 3):
        shards = [list(epoch_batches(n, 8, seed=3, epoch=epoch, rank=r, world_size=world)) for r in range(world)]
        for batches in zip(*shards):
            step += 1
            # Each position of each rank's batch gets its own logits (as augmented duplicates would).
            generator = torch.Generator().manual_seed(1000 + step)
            logits = [torch.randn(len(b), c, generator=generator) * 3 for b in batches]
            distributed.update(logits[rank], batches[rank], epoch)
            fast.update(logits[rank], batches[rank], epoch)
            reference.update(torch.cat(logits), torch.cat(batches), epoch)
    fast_diff = float((fast.ensemble - reference.ensemble).abs().max())
    # One extra step with unequal batch sizes per rank (exercises the padded all-gather).
    sizes = [5, 3][:world] + [2] * max(0, world - 2)
    generator = torch.Generator().manual_seed(7)
    index = [torch.randint(0, n, (s,), generator=generator) for s in sizes]
    logits = [torch.randn(s, c, generator=generator) for s in sizes]
    distributed.update(logits[rank], index[rank], 3)
    reference.update(torch.cat(logits), torch.cat(index), 3)

    gathered = [torch.empty_like(distributed.ensemble) for _ in range(world)]
    dist.all_gather(gathered, distributed.ensemble)
    if rank == 0:
        result = {
            "max_abs_diff_to_single_process": float((distributed.ensemble - reference.ensemble).abs().max()),
            "fast_path_max_abs_diff_to_single_process": fast_diff,
            "ranks_identical": all(torch.equal(g, gathered[0]) for g in gathered),
            "rows_touched": int((reference.ensemble.sum(1) > 0).sum()),
            "dtype": str(distributed.ensemble.dtype),
            "steps": step + 1,
        }
        (out / "te.json").write_text(json.dumps(result))


class StopAfterEpoch(BaseException):
    """A stop of every rank at the same point, as a kill: a BaseException (as KeyboardInterrupt), which
    the CLI does not report to the other ranks as a failure."""


def train(out: Path, run: str, args: list[str], stop_after: int | None, stop_at_step: int | None = None) -> None:
    import at_memorization.cli as cli
    import at_memorization.training.loop as training  # the module whose epoch_batches the loop calls

    rank = dist.get_rank()
    seen: list[dict] = []
    original_batches = training.epoch_batches

    def recording_batches(*a, **kw):
        batches = list(original_batches(*a, **kw))
        seen.append({"epoch": kw["epoch"], "rank": kw["rank"], "indices": torch.cat(batches).tolist()})
        return iter(batches)

    original_end = cli._ProgressCallbacks.epoch_end

    def stopping_end(self, record):
        original_end(self, record)
        if stop_after is not None and record["epoch"] >= stop_after:
            raise StopAfterEpoch

    original_step, steps = cli._ProgressCallbacks.step, []

    def stopping_step(self):  # as a kill in the middle of a step: every rank at the same step
        steps.append(1)
        if stop_at_step is not None and len(steps) >= stop_at_step:
            raise StopAfterEpoch
        original_step(self)

    training.epoch_batches = recording_batches
    cli._ProgressCallbacks.epoch_end = stopping_end
    cli._ProgressCallbacks.step = stopping_step
    try:
        cli.main(["train", *args, "--out", str(out / run)], standalone_mode=False)
    except StopAfterEpoch:
        pass
    finally:
        training.epoch_batches = original_batches
        cli._ProgressCallbacks.epoch_end = original_end
        cli._ProgressCallbacks.step = original_step
    (out / f"batches-{run}-rank{rank}.json").write_text(json.dumps(seen))
    dist.barrier()


def main() -> None:
    out = Path(sys.argv[1])
    args = sys.argv[2:]
    dist.init_process_group("gloo")
    try:
        te_check(out)
        train(out, "full", args, stop_after=None)
        train(out, "interrupted", args, stop_after=1)
        train(out, "midepoch", [*args, "--checkpoint-every-steps", "1"], stop_after=None, stop_at_step=3)
        if dist.get_rank() == 0:
            (out / "midepoch-partial.pt").write_bytes((out / "midepoch" / "last.pt").read_bytes())
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
