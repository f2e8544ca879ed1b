"""Loading a JSONL dataset at scale: load time, peak memory and draw cost for 10^4, 10^5 and 10^6 rows.

    python benchmarks/data_scale.py                  # 10^4, 10^5, 10^6 rows (~2, 20, 200 MB)
    python benchmarks/data_scale.py --quick --out D  # 10^3, 10^4 rows (what the test runs)

Each file holds rows of ~200 bytes (``{"prompt": ..., "answer": ...}``) with one malformed row in every
1000, loaded with ``on_bad_row = "skip"``.  Each size is measured in a fresh Python process, so its
peak RSS (``ru_maxrss``) is that of one load: ``rss_base_mb`` is the peak after importing the loader,
``rss_peak_mb`` its peak after loading and drawing, and ``index_mb`` the index the loader keeps
(``orchestrator/data.py``: 16 bytes a row).  Draws: 10^4 prompts through the epoch order (the first
draw of an epoch shuffles all N rows once; ``draw_us`` is the mean of the rest).
Writes ``results/data_scale_<date>.md`` and ``.json`` (``--out`` elsewhere), with the load average.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FULL, QUICK = (10_000, 100_000, 1_000_000), (1_000, 10_000)
BAD_EVERY = 1000  # one malformed row per this many
DRAWS = 10_000
WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet")


def write_rows(path: Path, n: int) -> int:
    """``n`` rows of ~200 bytes, every ``BAD_EVERY``-th one malformed; returns the file's size."""
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            if i % BAD_EVERY == BAD_EVERY - 1:
                f.write('{"prompt": "a row cut short\n')
                continue
            words = " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(22))
            f.write(json.dumps({"prompt": f"Question {i}: repeat these words: {words}", "answer": str(i)}) + "\n")
    return path.stat().st_size


# The measurement, run in a fresh interpreter per size (argv: path, number of draws).
CHILD = r"""
import json, resource, sys, time
from orchestrator.data import EpochOrder, load_jsonl

def rss_mb():  # the peak so far (Linux: KiB)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

path, draws = sys.argv[1], int(sys.argv[2])
base = rss_mb()
t0 = time.perf_counter()
rows, bad = load_jsonl(path, on_bad_row="skip")
load_s = time.perf_counter() - t0
order = EpochOrder(0, len(rows))
t0 = time.perf_counter()
rows[order.draw(0)]
first_s = time.perf_counter() - t0
t0 = time.perf_counter()
for k in range(1, draws):
    rows[order.draw(k)]
rest_s = time.perf_counter() - t0
index = rows.offsets.itemsize * len(rows.offsets) + rows.lengths.itemsize * len(rows.lengths) \
    + rows.lines.itemsize * len(rows.lines)
print(json.dumps({"rows": len(rows), "bad": bad, "load_s": load_s, "first_draw_s": first_s,
                  "draw_us": 1e6 * rest_s / max(1, draws - 1), "rss_base_mb": base,
                  "rss_peak_mb": rss_mb(),
                  "index_mb": index / 2**20}))
"""


def measure(path: Path, draws: int = DRAWS) -> dict:
    """One load of ``path`` in a fresh interpreter: the child's JSON line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(draws)], check=True, capture_output=True,
                         text=True, env=env, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def load_average() -> str:
    """The 1/5/15-minute load averages as ``uptime`` prints them."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def table(results: list[dict]) -> str:
    head = ("| rows | file (MB) | bad rows | load (s) | rows/s | peak RSS (MB) | base RSS (MB) | peak - base (MB) "
            "| peak - base / file | index (MB) | first draw (s) | draw (us) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        grown = r["rss_peak_mb"] - r["rss_base_mb"]
        lines.append(
            f"| {r['rows_written']:,} | {r['file_mb']:.1f} | {r['bad']} | {r['load_s']:.2f} | "
            f"{r['rows_written'] / r['load_s']:,.0f} | {r['rss_peak_mb']:.1f} | {r['rss_base_mb']:.1f} | {grown:.1f} | "
            f"{grown / r['file_mb']:.3f} | {r['index_mb']:.2f} | {r['first_draw_s']:.3f} | {r['draw_us']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10^3 and 10^4 rows")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="where the .md and .json go")
    args = ap.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    date = datetime.date.today().isoformat()
    before = load_average()
    results = []
    with tempfile.TemporaryDirectory(prefix="data_scale_") as tmp:
        for n in sizes:
            path = Path(tmp) / f"rows_{n}.jsonl"
            size = write_rows(path, n)
            r = {"rows_written": n, "file_mb": size / 2**20, **measure(path)}
            results.append(r)
            print(json.dumps(r), file=sys.stderr)
            path.unlink()
    after = load_average()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"data_scale_{date}{'_quick' if args.quick else ''}"
    meta = {"date": date, "load_average_before": before, "load_average_after": after, "cores": os.cpu_count(),
            "python": sys.version.split()[0], "draws": DRAWS, "bad_every": BAD_EVERY}
    stem.with_suffix(".json").write_text(json.dumps({**meta, "results": results}, indent=1) + "\n")
    stem.with_suffix(".md").write_text(
        f"# Dataset loading at scale ({date})\n\n"
        f"`benchmarks/data_scale.py{' --quick' if args.quick else ''}`; {os.cpu_count()} cores, Python "
        f"{meta['python']}; load average (1/5/15 min) {before} before, {after} after.\n"
        "Each size in a fresh process; MB = 2^20 bytes; one malformed row in every "
        f"{BAD_EVERY} (skipped and counted).\n\n{table(results)}\n"
    )
    print(stem.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
