"""benchmarks/data_scale.py --quick: real files of 10^3 and 10^4 rows, each loaded in its own process;
checks that the table and JSON are well-formed and that the numbers are those of the files written."""

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_quick_writes_a_table_and_json(tmp_path):
    p = subprocess.run([sys.executable, "benchmarks/data_scale.py", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    (js,) = tmp_path.glob("data_scale_*_quick.json")
    (md,) = tmp_path.glob("data_scale_*_quick.md")
    data = json.loads(js.read_text())
    assert len(data["load_average_before"].split(", ")) == 3 and data["draws"] == 10_000
    rows = data["results"]
    assert [r["rows_written"] for r in rows] == [1_000, 10_000]
    for r in rows:
        n = r["rows_written"]
        assert r["bad"] == n // 1000 and r["rows"] == n - n // 1000  # one malformed row in every 1000, skipped
        assert r["index_mb"] * 2**20 == 16 * r["rows"]  # offset 8 + length 4 + line 4 bytes a row
        assert 150 < r["file_mb"] * 2**20 / n < 260  # ~200 bytes a row
        assert r["load_s"] > 0 and r["draw_us"] > 0 and r["rss_peak_mb"] >= r["rss_base_mb"] > 0
    table = [ln for ln in md.read_text().splitlines() if ln.startswith("|")]
    assert len(table) == 4 and table[2].startswith("| 1,000 | 0.2 | 1 |") and table[3].startswith("| 10,000 | 2.0 | 10 |")
    assert all(ln.count("|") == table[0].count("|") for ln in table)
