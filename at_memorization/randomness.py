"""Random-number state: capture/restore for exact resume, and isolation for evaluation.

APGD, FAB and Square (torchattacks and pyautoattack alike) call ``torch.manual_seed``, and PGD's
random start draws from the global generator: evaluating inside a training process would change
the training run's random stream. ``isolated_rng`` runs such code on a forked, fixed-seed stream
and puts the caller's state back afterwards.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


def capture_rng() -> dict:
    """All global generator states, as tensors and plain values (checkpoint-safe)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def isolated_rng(seed: int = 0):
    """Run the body on a fresh stream seeded with ``seed``; restore every global state after."""
    saved = capture_rng()
    try:
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        yield
    finally:
        restore_rng(saved)
