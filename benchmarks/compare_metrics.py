"""Compare the metrics.jsonl rows of runs made before and after a change (behaviour-preserving refactors).

    python benchmarks/compare_metrics.py BEFORE_DIR AFTER_DIR [TOLERANCE]

Each directory holds one output directory per run (same names on both sides). Every value of every row is
compared per step, except wall-clock ones (``time/``, ``busy/``, ``async/overlap``, ``heartbeat/``); a number
matches within TOLERANCE relative to max(1, |value|) (default 1e-6), NaN matches NaN. Prints one line per run
with the largest absolute difference, and each mismatch.
"""
import json, math, sys
from pathlib import Path
IGN = ("time/", "busy/", "async/overlap", "heartbeat/")
def rows(p):
    out = {}
    for line in open(p):
        r = json.loads(line)
        k = (r["step"], tuple(sorted(x for x in r if not x.startswith(IGN))))
        out.setdefault(r["step"], []).append({x: v for x, v in r.items() if not x.startswith(IGN) and x != "_timestamp"})
    return out
def close(a, b, tol):
    if a is None or b is None: return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if math.isnan(a) and math.isnan(b): return True
        return abs(a - b) <= tol * max(1.0, abs(a), abs(b))
    return a == b
def main(base, after, tol=1e-6):
    for run in sorted(Path(base).iterdir()):
        if not run.is_dir(): continue
        a, b = run / "metrics.jsonl", Path(after) / run.name / "metrics.jsonl"
        if not b.exists(): print(f"{run.name}: no after run"); continue
        ra, rb = rows(a), rows(b)
        diffs, keys, maxd = [], 0, 0.0
        if sorted(ra) != sorted(rb): diffs.append(f"steps {sorted(ra)} vs {sorted(rb)}")
        for s in sorted(set(ra) & set(rb)):
            la, lb = ra[s], rb[s]
            ka = sorted(set().union(*la)); kb = sorted(set().union(*lb))
            if ka != kb: diffs.append(f"step {s} keys differ: only before {sorted(set(ka)-set(kb))}, only after {sorted(set(kb)-set(ka))}")
            ma = {k: v for r in la for k, v in r.items()}; mb = {k: v for r in lb for k, v in r.items()}
            for k in set(ma) & set(mb):
                keys += 1
                x, y = ma[k], mb[k]
                if isinstance(x, (int, float)) and isinstance(y, (int, float)) and not (math.isnan(x) or math.isnan(y)):
                    maxd = max(maxd, abs(x - y))
                if not close(x, y, tol): diffs.append(f"step {s} {k}: {x} vs {y}")
        print(f"{run.name}: {len(ra)} step rows, {keys} values compared, max |diff| {maxd:.3g}, {'SAME' if not diffs else 'DIFF'}")
        for d in diffs[:8]: print("   ", d)
if __name__ == "__main__":
    main(*sys.argv[1:3], *(float(x) for x in sys.argv[3:]))
