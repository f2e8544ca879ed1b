"""A record, not a tool: the one-off script that wrote vs_trl_2026-12-02_smollm2.md/.json (paths as on that machine).

Assemble vs_trl --setup smollm2's results from its finished runs (the script stopped writing its table:
a 0 accuracy ratio, fixed since). Run times come from the log's side timestamps (each includes ~1-2 s of the
next side's set-up); the matmul peak is measured now, after the runs, on the same quiet cores."""
import os, sys, time
from pathlib import Path
sys.path.insert(0, "/work/main/benchmarks")
import vs_trl as v
from profile_run import write_results
work = Path("/tmp/bench/vs_smollm2")
setup = v.SETUPS["smollm2"]
start = 1338 + os.path.getmtime(work / "ours_s0" / "config.toml") - 29  # log seconds -> wall clock
end_async2 = max(p.stat().st_mtime for p in (work / "ours_async_s2").rglob("*") if p.is_file())
log = {0: [("ours", 29, 204, 1.4), ("ours_async", 204, 365, 1.6), ("trl", 365, 513, 2.9)],
       1: [("ours_async", 513, 673, 1.2), ("trl", 673, 831, 2.7), ("ours", 831, 998, 1.1)],
       2: [("trl", 998, 1164, 1.6), ("ours", 1164, 1338, 1.0), ("ours_async", 1338, None, 1.4)]}
t_conf0 = os.path.getmtime(work / "ours_s0" / "config.toml")
pairs = []
for seed, sides in log.items():
    spec = v.build_spec(setup, 10, seed, setup.full["overrides"])
    n = v.count_params(spec["student"])
    result = {}
    for name, a, b, load in sides:
        run_s = (b - a) if b is not None else end_async2 - (t_conf0 - 29 + 1338) + 0.0
        if name == "trl":
            result[name] = v.trl_summary(work / f"trl_out_s{seed}.json", run_s, spec, setup, n)
        else:
            result[name] = v.ours_summary(setup, work / f"{name}_s{seed}", run_s, name, seed, spec, n)
    ratios = {k: v.pair_ratios(result[k], result["trl"]) for k in setup.variants}
    loads = [l for *_, l in sides]
    pairs.append({"seed": seed, "order": [s[0] for s in sides], **result, "ratio": ratios["ours"], "ratios": ratios,
                  "load_before": loads[0], "load_after": max(loads)})
peak = v.matmul_peak(os.cpu_count() or 1)
title = "SmolLM2-135M context distillation"
table = v.markdown(pairs, "python benchmarks/vs_trl.py --setup smollm2", "TRL environment: " + " ".join(v.trl_env.PINS),
                   [peak, peak], title)
note = ("\nAssembled after the run from its outputs (`/tmp/bench/recover_smollm2.py`): the script stopped while "
        "writing this table (a held-out accuracy ratio of 0, which the table now accepts). Each run's whole wall "
        "time is the gap between the log's timestamps of consecutive sides (about 1-2 s of the next side's set-up "
        "included); the matrix-multiply peak was measured once, right after the runs, not at their start and end; "
        "'load avg' is the 1-minute load at the start of each pair's first side and the highest at any side's start.\n")
diffs = v.DIFFERENCES + v.DIFFERENCES_SMOLLM2
path = write_results(Path("/work/main/benchmarks/results"), f"vs_trl_{time.strftime('%Y-%m-%d')}_smollm2", "Against TRL",
                     f"{table}{note}\nWhat differs:\n\n{diffs}\n{v.FLOPS_NOTE}",
                     {"setup": "smollm2", "pairs": pairs, "matmul_peak_flop_s": [peak], "n_params": n,
                      "assembled_after": True}, v.plot(pairs, title))
print(table); print(path)
