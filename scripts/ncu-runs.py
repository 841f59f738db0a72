"""Summarizes an Nsight Compute CSV (`--metrics gpu__time_duration.sum --csv`) of a benchmark
that times configurations one after another (the kernels bench's sweeps): a segment starts
whenever its first kernel reappears with another grid or block size; each segment prints its
kernels' launch counts and median durations — device time, free of host launch overhead.
    python3 scripts/ncu-runs.py ncu.csv"""
import csv, statistics, sys

SCALE = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}
rows = [r for r in csv.DictReader(l for l in open(sys.argv[1]) if l.startswith('"'))
        if r["Metric Name"] == "gpu__time_duration.sum"]
segments = []  # [(head (name, grid, block), {key: [times]})]
for r in rows:
    name = r["Kernel Name"].split("(")[0][:40]
    key = (name, r["Grid Size"], r["Block Size"])
    t = float(r["Metric Value"].replace(",", "")) * SCALE[r["Metric Unit"]]
    if not segments or (name == segments[-1][0][0] and key != segments[-1][0]):
        segments.append((key, {}))
    segments[-1][1].setdefault(key, []).append(t)
for head, kernels in segments:
    parts = [f"{n} grid {g} block {b}: {len(ts)} x {statistics.median(ts):.1f} us"
             for (n, g, b), ts in kernels.items()]
    print(" | ".join(parts))
