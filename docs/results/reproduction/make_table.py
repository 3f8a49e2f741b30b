"""Summarize the CPU-scale reproduction runs into the rows of docs/REPRODUCTION.md.

    python docs/results/reproduction/make_table.py > docs/results/reproduction/summary.json
    python docs/results/reproduction/make_table.py --markdown
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
        for suffix in ("", "_aa"):
            result = evaluation(run, which + suffix)
            if result:
                row[f"{which}_eval{suffix}"] = {k: v for k, v in result.items()
                                                if k.endswith("_acc") or k in ("n_examples", "epoch")}
    return row




def markdown(rows):
    """The rows of docs/REPRODUCTION.md's CPU-scale tables (percent, as in the paper)."""
    def pct(value):
        return "-" if value is None else f"{100 * value:.1f}"

    lines = ["| run | best epoch | best: clean / PGD-20 / CW / AA | final: clean / PGD-20 / CW / AA | best - final (PGD-20) | final train robust (PGD-10, 200 pts) |",
             "|---|---|---|---|---|---|"]
    for run, row in rows.items():
        if not row:
            continue
        cells = []
        for which in ("best", "final"):
            ev, aa = row.get(f"{which}_eval") or {}, row.get(f"{which}_eval_aa") or {}
            cells.append(" / ".join(pct(v) for v in (ev.get("clean_acc"), ev.get("pgd20_acc"), ev.get("cw_acc"),
                                                       aa.get("autoattack_acc"))))
        best_pgd = (row.get("best_eval") or {}).get("pgd20_acc")
        final_pgd = (row.get("final_eval") or {}).get("pgd20_acc")
        gap = pct(best_pgd - final_pgd) if best_pgd is not None and final_pgd is not None else "-"
        lines.append(f"| {run} | {row['best_epoch']} | {cells[0]} | {cells[1]} | {gap} | {pct(row['final_train_robust'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    runs = ["pgd-at", "pgd-at-te", "small-pgd-at", "small-pgd-at-te", "small-trades", "small-trades-te"]
    rows = {run: summarize(run) for run in runs}
    print(markdown(rows) if "--markdown" in sys.argv else json.dumps(rows, indent=2))
