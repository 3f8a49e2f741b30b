"""Is a checkpoint's prediction input-independent, and where does the signal die?

For each checkpoint: the spread of its logits over 256 MNIST test images, the classes it predicts,
and per ReLU the share of units active on at least one image and the mean (over units) standard
deviation of the activation across images. Writes JSON to stdout.

    python docs/results/evidence/awp-smallcnn/probe_features.py \
        docs/results/mnist-label-noise/runs/pgd-at-awp-s0/last.pt \
        docs/results/mnist-label-noise/runs/pgd-at-s0/last.pt \
        docs/results/evidence/awp-smallcnn/runs/awp-gamma0.01-warmup5/last.pt > probe.json
"""
import json
import sys

import torch

from at_memorization.checkpoint import build_model_from_checkpoint, load_checkpoint
from at_memorization.data import load_data


def probe(path: str, images: torch.Tensor) -> dict:
    checkpoint = load_checkpoint(path)
    model = build_model_from_checkpoint(checkpoint).eval()
    activations = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ReLU):
            module.register_forward_hook(lambda m, i, o, name=name: activations.__setitem__(name, o.flatten(1)))
    with torch.no_grad():
        logits = model(images)
    return {
        "checkpoint": path,
        "epoch": checkpoint["epoch"],
        "logit_std_over_images": round(logits.std(0).mean().item(), 4),
        "predicted_classes": logits.argmax(1).unique().tolist(),
        "relu": {name: {"units_ever_active": round((a > 0).any(0).float().mean().item(), 3),
                        "std_over_images": round(a.std(0).mean().item(), 4)}
                 for name, a in activations.items()},
    }


if __name__ == "__main__":
    data = load_data("mnist", "../shared/data/mnist", train_size=10, test_size=256, download=False)
    images = data.test.images.float() / 255
    json.dump([probe(path, images) for path in sys.argv[1:]], sys.stdout, indent=1)
    print()
