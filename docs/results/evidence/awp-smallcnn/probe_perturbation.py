"""One AWP perturbation of the epoch-5 PGD-AT model (runs/pgd-at/last.pt, made by run.sh): the
cross-entropy of 256 adversarial training examples at the weights, after the perturbation
(gamma 0.01 and 0.002, the proxy step on the first 32 of them as AWP's), and after a random
perturbation of the same per-layer size. Run from the repository root."""
import copy

import torch
import torch.nn.functional as F
import torchattacks

from at_memorization.checkpoint import build_model_from_checkpoint, load_checkpoint
from at_memorization.data import load_data

RUN = "docs/results/evidence/awp-smallcnn/runs/pgd-at"
torch.manual_seed(0)
model = build_model_from_checkpoint(load_checkpoint(f"{RUN}/last.pt")).eval()
labels = torch.load(f"{RUN}/labels.pt", weights_only=True)["labels"]  # the run's noisy labels
data = load_data("mnist", "../shared/data/mnist", train_size=500, test_size=10, download=False)
x, y = data.train.images[:256].float() / 255, labels[:256]
x_adv = torchattacks.PGD(model, eps=0.1, alpha=0.04, steps=3, random_start=True)(x, y)


def cross_entropy(m):
    with torch.no_grad():
        return round(F.cross_entropy(m(x_adv), y).item(), 3)


def perturbed(direction, gamma):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "weight" in name and p.dim() > 1:
                d = direction[name] - p if direction is not None else torch.randn_like(p)
                p.add_(gamma * p.norm() / (d.norm() + 1e-20) * d)
    return m


proxy = copy.deepcopy(model).train()
weights = {n: p for n, p in proxy.named_parameters() if "weight" in n and p.dim() > 1}
optimizer = torch.optim.SGD(weights.values(), lr=0.01)
optimizer.zero_grad()
(-F.cross_entropy(proxy(x_adv[:32]), y[:32])).backward()
optimizer.step()
print("at the weights:", cross_entropy(model))
for gamma in (0.01, 0.002):
    print(f"gamma {gamma}: AWP direction {cross_entropy(perturbed(weights, gamma))}, "
          f"random direction {cross_entropy(perturbed(None, gamma))}")
