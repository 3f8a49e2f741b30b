"""The README's drop-in TE section runs as written (issue 19), inside a user's own setting: the
names the section leaves to the user (a data set, a model taking normalized inputs, MEAN/STD, a
Rice et al.-style ``attack_pgd``, an optimizer) are defined by a prelude, as a user's script would;
the section's code is then run verbatim, in a fresh interpreter. The same holds for every snippet of
docs/drop_in.md, one per codebase shape (issue 31): PGD-AT, TRADES, FGSM / fast AT, normalization in
the model, the loop and the loader."""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

import pytest

from subprocess_guard import run_with_hang_guard

README = Path(__file__).resolve().parents[1] / "README.md"

PRELUDE = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    epochs = 6
    MEAN, STD = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    train_set = TensorDataset(torch.rand(48, 3, 8, 8), torch.randint(0, 10, (48,)))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    normalize = lambda x: (x - MEAN) / STD

    def attack_pgd(model, x, y, *settings, penalty, eps=8 / 255, alpha=2 / 255, steps=3, restarts=2):
        """Rice et al.'s attack_pgd, in train mode, with restarts and normalization in the loop."""
        best, best_loss = torch.zeros_like(x), torch.full((len(y),), -float("inf"))
        for _ in range(restarts):
            delta = (torch.rand_like(x) * 2 - 1) * eps
            delta = (x + delta).clamp(0, 1) - x
            delta.requires_grad_(True)
            for _ in range(steps):
                output = model(normalize(x + delta))
                loss = F.cross_entropy(output, y) + penalty(output)      # the one added line
                grad, = torch.autograd.grad(loss, delta)
                delta = (delta + alpha * grad.sign()).clamp(-eps, eps)
                delta = ((x + delta).clamp(0, 1) - x).detach().requires_grad_(True)
            with torch.no_grad():
                output = model(normalize(x + delta))
                per_sample = F.cross_entropy(output, y, reduction="none") + penalty(output, reduction="none")
                better = per_sample >= best_loss
                best[better], best_loss[better] = delta[better].detach(), per_sample[better]
        return best
''')

CHECKS = textwrap.dedent('''
    assert te.ensemble.sum() > 0, "the ensemble was updated"
    assert float(te.weight(epochs - 1)) == 300.0, "the full weight by the end of the run"
    print("ok", float(loss))
''')


def test_the_readme_drop_in_section_runs_as_written(tmp_path):
    text = README.read_text()
    section = text.split("### Drop-in TE", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1
    script = tmp_path / "user_loop.py"
    script.write_text(PRELUDE + "\n# --- the README's section, verbatim ---\n" + blocks[0] + CHECKS)
    result = run_with_hang_guard([sys.executable, str(script)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok ")


# --------------------------------------------------------------------------- docs/drop_in.md (issue 31)
DROP_IN = Path(__file__).resolve().parents[1] / "docs" / "drop_in.md"

_SMALL = textwrap.dedent('''
    import torch
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    epochs = 6
    {constants}
    {data} = TensorDataset({images}, torch.randint(0, 10, (48,)))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 10))
    {optimizer} = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
''')


def small(data="train_set", images="torch.rand(48, 3, 8, 8)", constants="", optimizer="opt", then=""):
    """A tiny CPU setting: the codebase's ``constants``, a data set named ``data``, a model, an optimizer."""
    return _SMALL.format(constants=textwrap.dedent(constants), data=data, images=images,
                         optimizer=optimizer) + textwrap.dedent(then)


NORMALIZATION = '''
    MEAN, STD = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    normalize = lambda x: (x - MEAN) / STD
'''
FAST_ADVERSARIAL = '''
    mu = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
    std = torch.tensor([0.2471, 0.2435, 0.2616]).view(3, 1, 1)
    upper_limit, lower_limit = (1 - mu) / std, (0 - mu) / std

    def clamp(X, lower_limit, upper_limit):
        return torch.max(torch.min(X, upper_limit), lower_limit)
'''
TRADES = '''
    decay_epoch = 5

    def adjust_learning_rate(optimizer, epoch):
        for param_group in optimizer.param_groups:
            param_group["lr"] = 0.05 * (0.1 if epoch >= decay_epoch else 1.0)
'''
ENSEMBLED = "assert te.ensemble.sum() > 0 and te.weight(epochs - 1) == 300.0\n"

# What each snippet's codebase provides itself, and what must hold after the snippet ran.
SNIPPETS = {
    "pgd-at": (small(then="""
        milestones = [3, 5]
        scheduler = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    """), "assert (te.start_epoch, te.end_epoch) == (3, 5)\n" + ENSEMBLED.replace("epochs - 1", "epochs")),  # from 1
    "trades": (small(optimizer="optimizer", then=TRADES),
               "assert (te.start_epoch, te.end_epoch) == (4, 6) and torch.isfinite(loss)\n"
               + ENSEMBLED.replace("epochs - 1", "epochs")),  # epochs from 1
    "fast-at": (small(data="train_dataset", images="(torch.rand(48, 3, 8, 8) - mu) / std", constants=FAST_ADVERSARIAL),
                "assert (te.start_epoch, te.end_epoch) == (3, 4) and torch.isfinite(loss)\n" + ENSEMBLED),
    "normalize-in-loop": (small(constants=NORMALIZATION), ENSEMBLED),
    "normalize-in-loader": (small(data="normalized_train_set", images="normalize(torch.rand(48, 3, 8, 8))",
                                  constants=NORMALIZATION), ENSEMBLED),
}


def drop_in_snippets() -> dict[str, str]:
    """The page's runnable snippets: each ```python block right after a ``<!-- snippet: NAME -->`` line."""
    return dict(re.findall(r"<!-- snippet: ([\w-]+) -->\n```python\n(.*?)```", DROP_IN.read_text(), flags=re.S))


def test_every_snippet_of_the_drop_in_page_is_run():
    assert set(drop_in_snippets()) == set(SNIPPETS)


@pytest.mark.parametrize("name", sorted(SNIPPETS))
def test_the_drop_in_page_snippets_run_as_written(name, tmp_path):
    prelude, checks = SNIPPETS[name]
    script = tmp_path / f"{name}.py"
    script.write_text(prelude + "\n# --- docs/drop_in.md, verbatim ---\n" + drop_in_snippets()[name] + checks
                      + 'print("ok")\n')
    result = run_with_hang_guard([sys.executable, "-W", "error::UserWarning", str(script)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")
