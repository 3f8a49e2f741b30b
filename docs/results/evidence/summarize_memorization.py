"""Per method, over seeds: how many mislabeled / correctly labeled training samples each run fits
(adversarially, at the last epoch) and how many it fits only after TE switches on (epoch 17).

    at-mem memorization RUNS... --late-after 17 --output docs/results/evidence/memorization.json
    python docs/results/evidence/summarize_memorization.py docs/results/evidence/memorization.json
"""

import json
import statistics
import sys
from collections import defaultdict

reports = json.load(open(sys.argv[1]))["reports"]
rows = defaultdict(list)
for r in reports:
    method = r["run"].rsplit("-s", 1)[0]
    noisy, clean = r["noisy_labels"]["noisy"], r["noisy_labels"]["clean"]
    rows[method].append((noisy["fitted_at_end"] / noisy["count"], noisy["late"] / noisy["count"],
                         clean["fitted_at_end"] / clean["count"], r["noisy_labels"]["fraction_of_late_that_are_noisy"],
                         noisy["count"]))


def cell(values):
    values = [100 * v for v in values]
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


print("| method | seeds | mislabeled samples fitted at the end | mislabeled samples fitted after epoch 17 "
      "| correctly labeled fitted at the end | share of the late-fitted that are mislabeled |")
print("|---|---|---|---|---|---|")
for method, values in rows.items():
    columns = list(zip(*values))
    print(f"| {method} | {len(values)} | {cell(columns[0])} | {cell(columns[1])} | {cell(columns[2])} | {cell(columns[3])} |")
print(f"\nPercent, mean ± sample std over seeds; {', '.join(str(c) for c in sorted(set(v[4] for vs in rows.values() for v in vs)))} "
      "of the 500 training labels are wrong in each seed's draw.")
