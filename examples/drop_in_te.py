"""Temporal ensembling as a drop-in loss in a plain PyTorch + torchattacks training loop.

The loop is written the way foreign training scripts are: its data set yields ``(image, label)``, it
normalizes outside the model (``model(normalize(x))``), counts epochs from 0 and calls
``model.train()`` once per epoch. The TE additions are marked ``# TE``:

- ``WithIndex`` makes the items ``(image, label, index)``; ``without_index`` gives the (x, y) view
  that the accuracy helper expects;
- ``TELoss.for_run`` scales the schedule to the run (45% / 75%) in the loop's own epoch counting;
- ``te.update_from`` is the whole ensemble update (eval mode, no_grad, modes restored, once per step);
- ``TEPGD(..., mean=, std=)`` takes and returns [0, 1] images and normalizes inside its forwards;
- ``te(logits, index, epoch)`` is the penalty added to the training loss.

    python examples/drop_in_te.py --data-dir ../shared/data/mnist --train-size 1000 --epochs 6
"""

from __future__ import annotations

import argparse

import timm
import torch
import torch.nn.functional as F

from at_memorization import TELoss, TEPGD, WithIndex, without_index  # TE
from at_memorization.data import load_split

MEAN, STD = (0.1307,), (0.3081,)  # MNIST's; the model below expects normalized inputs


def normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(MEAN).view(1, -1, 1, 1)) / torch.tensor(STD).view(1, -1, 1, 1)


def accuracy(model, loader) -> float:
    """An ordinary helper that unpacks (x, y) batches."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(normalize(x)).argmax(1) == y).sum())
            total += len(y)
    return correct / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data/mnist", help="folder with the MNIST .gz files")
    parser.add_argument("--train-size", type=int, default=1000)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    # An ordinary (image, label) data set, as most scripts have.
    split = load_split("mnist", args.data_dir, train=True, size=args.train_size)
    pairs = torch.utils.data.TensorDataset(split.images.float() / 255, split.labels)
    test = load_split("mnist", args.data_dir, train=False, size=args.test_size)
    test_loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(test.images.float() / 255, test.labels), batch_size=256)

    train = WithIndex(pairs)  # TE: items are (image, label, index)
    loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True)

    model = timm.create_model("smallcnn", num_classes=10, in_chans=1)  # registered by at_memorization
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    te = TELoss.for_run(len(train), 10, epochs=args.epochs, epoch_origin=0)  # TE: this loop counts from 0
    attack = TEPGD(model, te, eps=args.eps, alpha=args.eps / 4, steps=5, mean=MEAN, std=STD)  # TE

    for epoch in range(args.epochs):
        # As in the paper, the ensemble switches on around the first learning-rate decay.
        for group in optimizer.param_groups:
            group["lr"] = 0.01 if not te.active(epoch) else 0.001
        model.train()
        total_loss = total_te = 0.0
        for x, y, index in loader:
            te.update_from(model, x, index, epoch, mean=MEAN, std=STD)  # TE: no-op before the start
            x_adv = attack(x, y, index=index, epoch=epoch)  # [0, 1] in and out; eval mode inside
            logits = model(normalize(x_adv))
            penalty = te(logits, index, epoch)  # TE: exactly 0 before the start
            loss = F.cross_entropy(logits, y) + penalty
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(y)
            total_te += penalty.item() * len(y)
        train_acc = accuracy(model, without_index(loader))  # TE: the helper sees (x, y) batches
        print(f"epoch {epoch}: te_weight_now {te.weight(epoch):.3g} loss {total_loss / len(train):.4f} "
              f"te_loss {total_te / len(train):.4g} train clean acc {train_acc:.3f} "
              f"test clean acc {accuracy(model, test_loader):.3f}")


if __name__ == "__main__":
    main()
