"""Summarizes an Nsight Compute CSV (`--metrics gpu__time_duration.sum --csv`) of a benchmark
that times configurations one after another (the kernels bench's sweeps) and prints each
segment's kernels with their launch counts and median durations — device time, free of host
launch overhead. A segment starts whenever its first kernel reappears with another grid or
block size; with `--every MARKER COUNT` (configurations that share a grid and block size, each
run a fixed number of times), after every COUNT launches of the kernel named MARKER instead.
    python3 scripts/ncu-runs.py ncu.csv [--every split_kernel 104]"""
import csv, statistics, sys

SCALE = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}
rows = [r for r in csv.DictReader(l for l in open(sys.argv[1]) if l.startswith('"'))
        if r["Metric Name"] == "gpu__time_duration.sum"]
every = (sys.argv[3], int(sys.argv[4])) if sys.argv[2:3] == ["--every"] else None
segments = []  # [(head (name, grid, block), {key: [times]})]
seen = 0  # launches of the marker in the current segment (--every)
for r in rows:
    name = r["Kernel Name"].split("(")[0][:40]
    key = (name, r["Grid Size"], r["Block Size"])
    t = float(r["Metric Value"].replace(",", "")) * SCALE[r["Metric Unit"]]
    if every is None:
        starts = not segments or (name == segments[-1][0][0] and key != segments[-1][0])
    else:
        marker = every[0] in name
        starts = not segments or (marker and seen == every[1])
        seen = (0 if starts else seen) + marker
    if starts:
        segments.append((key, {}))
    segments[-1][1].setdefault(key, []).append(t)
for head, kernels in segments:
    parts = [f"{n} grid {g} block {b}: {len(ts)} x {statistics.median(ts):.1f} us"
             for (n, g, b), ts in kernels.items()]
    print(" | ".join(parts))
