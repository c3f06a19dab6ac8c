"""How long `tables.read_table` takes on 8,000 AG News rows as CSV and as parquet: child start,
read and reply (medians of 5, after a warm-up).

    python bench/table_load.py [--rows CSV]    # default: /work/shared/data/agnews_dev_train.csv
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tables  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--rows", default="/work/shared/data/agnews_dev_train.csv")
args = p.parse_args()
frame = pd.read_csv(args.rows, dtype={"text": str}, na_filter=False).iloc[:8000]
folder = tempfile.mkdtemp()
paths = {"csv": os.path.join(folder, "test.csv"), "parquet": os.path.join(folder, "test.parquet")}
frame.to_csv(paths["csv"], index=False)
frame.to_parquet(paths["parquet"])
for kind, path in paths.items():
    texts, labels, _ = tables.read_table(path)  # the warm-up, and a check
    assert texts == frame.text.tolist() and labels == frame.label.tolist()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        tables.read_table(path)
        times.append(time.perf_counter() - start)
    print(f"{kind:8s} {os.path.getsize(path):>10,} bytes  {1000 * statistics.median(times):.0f} ms")
