"""Temporal ensembling as a drop-in loss in a plain PyTorch + torchattacks training loop.

The only additions to an ordinary PGD-AT loop are marked ``# TE``: a ``TELoss`` sized to the
training set, the sample indices from the data loader, one ``update`` per step with the model's
eval-mode clean predictions, the ``TEPGD`` attack (PGD whose inner loss includes the penalty) and
the penalty added to the loss.

    python examples/drop_in_te.py --data-dir ../shared/data/mnist --train-size 1000 --epochs 6
"""

from __future__ import annotations

import argparse

import timm
import torch
import torch.nn.functional as F

from at_memorization import TELoss, TEPGD  # TE
from at_memorization.data import load_split


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

    # Any data set works if its items are (image, label, index); ours already are.
    train = load_split("mnist", args.data_dir, train=True, size=args.train_size)
    test = load_split("mnist", args.data_dir, train=False, size=args.test_size)
    loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True)

    model = timm.create_model("smallcnn", num_classes=10, in_chans=1)  # registered by at_memorization
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    start, end = max(1, args.epochs // 2), max(2, args.epochs - 1)
    te = TELoss(num_samples=len(train), num_classes=10, momentum=0.9, reg_weight=300.0,  # TE
                start_epoch=start, end_epoch=end)
    attack = TEPGD(model, te, eps=args.eps, alpha=args.eps / 4, steps=5)  # TE (PGD + penalty)

    for epoch in range(1, args.epochs + 1):
        # As in the paper, the ensemble switches on around the first learning-rate decay.
        for group in optimizer.param_groups:
            group["lr"] = 0.05 if epoch < start else 0.005
        total_loss = total_te = 0.0
        for x, y, index in loader:
            if te.active(epoch):  # TE: ensemble of eval-mode clean predictions
                model.eval()
                with torch.no_grad():
                    te.update(model(x), index, epoch)
            x_adv = attack(x, y, index=index, epoch=epoch)
            model.train()
            logits = model(x_adv)
            penalty = te(logits, index, epoch)  # TE
            loss = F.cross_entropy(logits, y) + penalty
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(y)
            total_te += penalty.item() * len(y)
        model.eval()
        with torch.no_grad():
            clean = (model(test.images.float() / 255).argmax(1) == test.labels).float().mean().item()
        print(f"epoch {epoch}: te_weight_now {te.weight(epoch):.3g} loss {total_loss / len(train):.4f} "
              f"te_loss {total_te / len(train):.4g} test clean acc {clean:.3f}")


if __name__ == "__main__":
    main()
