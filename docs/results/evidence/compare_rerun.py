"""The committed MNIST study (results/evidence) against the plan's rerun (results/mnist-label-noise):
the two tables and the per-seed values of docs/REPRODUCTION.md section 1, from the two studies'
report.json (`at-mem report --format json`). Run from the repository root."""
import json
import sys

COMMITTED = json.load(open("docs/results/evidence/report.json"))
RERUN = json.load(open(sys.argv[1] if len(sys.argv) > 1 else "docs/results/mnist-label-noise/report.json"))
GROUP_COLUMNS = ["best_epoch", "best_pgd20", "final_clean", "final_pgd20", "final_cw", "final_autoattack",
                 "gap_pgd20", "final_train_robust"]
PAIRED_COLUMNS = ["final_clean", "final_pgd20", "final_cw", "final_autoattack", "gap_pgd20"]


def cell(metric, key, signed):
    if not metric or not metric.get("n"):
        return "-"
    scale = 1 if key == "best_epoch" else 100
    mean = metric["mean"] * scale
    text = ("+" if signed and mean > 0 else "") + f"{mean:.1f}"
    # a metric with one seed is AutoAttack, measured on seed 0 only
    return text + " (s0)" if metric["n"] == 1 else text + f" ± {(metric.get('std') or 0) * scale:.1f}"


def side_by_side(first_header, count_key, rows, committed_by_name, name_of, columns, signed):
    """One row per rerun row, preceded by the committed row of the same name where there is one."""
    lines = [f"| {first_header} | | {count_key.split('_')[1]} | "
             + " | ".join(RERUN["metrics"][c] for c in columns) + " |",
             "|---|---|---|" + "---|" * len(columns)]
    for row in rows:
        name, committed = name_of(row), committed_by_name.get(name_of(row))
        for label, source in (("committed", committed), ("rerun", row)):
            if source is not None:
                shown = name if label == "committed" or committed is None else ""
                lines.append(f"| {shown} | {label} | {source[count_key]} | "
                             + " | ".join(cell(source["metrics"].get(c), c, signed) for c in columns) + " |")
    return "\n".join(lines)


def group_name(group):
    return group["label"]


def pair_name(pair):
    return f"{pair['other']} - {pair['base']}"


def percent(group, key):
    return [round(100 * v, 1) for v in group["metrics"][key]["values"]] if group else None


committed_groups = {group_name(g): g for g in COMMITTED["groups"]}
print(side_by_side("method", "n_seeds", RERUN["groups"], committed_groups, group_name, GROUP_COLUMNS, False))
print()
print(side_by_side("OTHER - BASE", "n_pairs", RERUN["paired"], {pair_name(p): p for p in COMMITTED["paired"]},
                   pair_name, PAIRED_COLUMNS, True))
print()
for group in RERUN["groups"]:
    committed = committed_groups.get(group_name(group))
    print(group["label"], "final pgd20 committed", percent(committed, "final_pgd20"), "rerun", percent(group, "final_pgd20"),
          "| gap committed", percent(committed, "gap_pgd20"), "rerun", percent(group, "gap_pgd20"))
