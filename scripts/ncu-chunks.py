"""Summarizes an Nsight Compute CSV (`--metrics gpu__time_duration.sum --csv`) of a benchmark
that runs each configuration a fixed number of times: a configuration ends after every
`count` launches of the kernel named `marker` (the first of each configuration's launches);
prints each configuration's kernels with their launch counts and median durations.
    python3 scripts/ncu-chunks.py ncu.csv split_kernel 104"""
import csv, statistics, sys

SCALE = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}
path, marker, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = [r for r in csv.DictReader(l for l in open(path) if l.startswith('"'))
        if r["Metric Name"] == "gpu__time_duration.sum"]
chunks, seen = [[]], 0
for r in rows:
    if marker in r["Kernel Name"]:
        if seen == count:
            chunks.append([])
            seen = 0
        seen += 1
    chunks[-1].append(r)
for chunk in chunks:
    times = {}
    for r in chunk:
        key = (r["Kernel Name"].split("(")[0][:32], r["Grid Size"], r["Block Size"])
        t = float(r["Metric Value"].replace(",", "")) * SCALE[r["Metric Unit"]]
        times.setdefault(key, []).append(t)
    print(" | ".join(f"{n} grid {g} block {b}: {len(ts)} x {statistics.median(ts):.1f} us"
                     for (n, g, b), ts in times.items()))
