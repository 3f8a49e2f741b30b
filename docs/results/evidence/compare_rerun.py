"""The committed MNIST study (results/evidence) against the plan rerun (results/mnist-label-noise):
the two tables and per-seed values of docs/REPRODUCTION.md section 1. Run from the repository root."""
import json, sys
A = json.load(open('docs/results/evidence/report.json'))
B = json.load(open(sys.argv[1] if len(sys.argv) > 1 else 'docs/results/mnist-label-noise/report.json'))
cols = ['best_epoch', 'best_pgd20', 'final_clean', 'final_pgd20', 'final_cw', 'final_autoattack', 'gap_pgd20', 'final_train_robust']
def fmt(m, key, paired=False):
    if not m or m.get('n', 0) == 0: return '-'
    s = 1 if key == 'best_epoch' else 100
    mean = m['mean'] * s; sign = '+' if paired and mean > 0 else ''
    if m['n'] == 1: return f"{sign}{mean:.1f} (s0)"
    return f"{sign}{mean:.1f} ± {(m.get('std') or 0)*s:.1f}"
ga = {g['label']: g for g in A['groups']}
print('| method | | seeds | ' + ' | '.join(B['metrics'][c] for c in cols) + ' |')
print('|---|---|---|' + '---|' * len(cols))
for g in B['groups']:
    a = ga.get(g['label'])
    if a:
        print(f"| {g['label']} | committed | {a['n_seeds']} | " + ' | '.join(fmt(a['metrics'].get(c), c) for c in cols) + ' |')
    print(f"| {g['label'] if not a else ''} | rerun | {g['n_seeds']} | " + ' | '.join(fmt(g['metrics'].get(c), c) for c in cols) + ' |')
pa = {(p['other'], p['base']): p for p in A['paired']}
pc = ['final_clean', 'final_pgd20', 'final_cw', 'final_autoattack', 'gap_pgd20']
print()
print('| OTHER - BASE | | pairs | ' + ' | '.join(B['metrics'][c] for c in pc) + ' |')
print('|---|---|---|' + '---|' * len(pc))
for p in B['paired']:
    a = pa.get((p['other'], p['base']))
    name = f"{p['other']} - {p['base']}"
    if a:
        print(f"| {name} | committed | {a['n_pairs']} | " + ' | '.join(fmt(a['metrics'].get(c), c, True) for c in pc) + ' |')
    print(f"| {name if not a else ''} | rerun | {p['n_pairs']} | " + ' | '.join(fmt(p['metrics'].get(c), c, True) for c in pc) + ' |')
# per-seed final PGD-20 values
print()
for g in B['groups']:
    a = ga.get(g['label'])
    vb = [round(100*v,1) for v in g['metrics']['final_pgd20']['values']]
    gb = [round(100*v,1) for v in g['metrics']['gap_pgd20']['values']]
    va = [round(100*v,1) for v in a['metrics']['final_pgd20']['values']] if a else None
    gaa = [round(100*v,1) for v in a['metrics']['gap_pgd20']['values']] if a else None
    print(g['label'], 'final pgd20 committed', va, 'rerun', vb, '| gap committed', gaa, 'rerun', gb)
