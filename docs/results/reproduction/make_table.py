"""Summarize the CPU-scale reproduction runs into the rows of docs/REPRODUCTION.md.

    python docs/results/reproduction/make_table.py > docs/results/reproduction/summary.json
"""

import json
from pathlib import Path

HERE = Path(__file__).parent


def metrics(run):
    path = HERE / run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def evaluation(run, which):
    path = HERE / run / f"eval_{which}.json"
    return json.loads(path.read_text()) if path.exists() else None


def summarize(run):
    records = metrics(run)
    if not records:
        return None
    best = max(records, key=lambda r: (r["test_robust_acc"], r["test_clean_acc"]))
    final = records[-1]
    row = {"epochs": len(records), "best_epoch": best["epoch"],
           "best_test_clean_pgd10": best["test_clean_acc"], "best_test_robust_pgd10": best["test_robust_acc"],
           "final_test_clean_pgd10": final["test_clean_acc"], "final_test_robust_pgd10": final["test_robust_acc"],
           "final_train_clean": final.get("train_clean_acc"), "final_train_robust": final.get("train_robust_acc"),
           "train_seconds_total": sum(r["train_seconds"] for r in records)}
    for which in ("best", "final"):
        result = evaluation(run, which)
        if result:
            row[f"{which}_eval"] = {k: v for k, v in result.items() if k.endswith("_acc") or k in ("n_examples", "epoch")}
    return row


if __name__ == "__main__":
    runs = ["pgd-at", "pgd-at-te", "trades", "trades-te", "random-pgd-at", "random-trades"]
    print(json.dumps({run: summarize(run) for run in runs}, indent=2))
