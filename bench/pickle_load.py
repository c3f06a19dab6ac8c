"""How long `data.read_texts` takes on an 8,000-row test.pkl of three shapes (medians of 5, after a warm-up).

    python bench/pickle_load.py [--repo DIR]    # DIR: another checkout, e.g. an older commit's worktree

Each shape is timed in a fresh process that imports `data` from --repo (default: this checkout), so the
figure includes whatever that release does: reading in-process, or in a child process.
"""
import argparse
import os
import pickle
import random
import subprocess
import sys
import tempfile

import datasets
import pandas as pd

p = argparse.ArgumentParser()
p.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
args = p.parse_args()
words = ["alpha", "beta", "gamma", "delta", "news", "market"]
rows = [" ".join(random.Random(i).choice(words) for _ in range(40)) for i in range(8000)]
shapes = {"Dataset": datasets.Dataset.from_dict({"text": rows}),
          "DataFrame": pd.DataFrame({"text": rows, "label": [1] * 8000}),
          "list of row dicts": [{"text": t, "label": 1} for t in rows]}
timer = ("import statistics, sys, time; sys.path.insert(0, sys.argv[1]); import data\n"
         "data.read_texts(sys.argv[2])\n"
         "times = []\n"
         "for _ in range(5):\n"
         "    start = time.perf_counter(); data.read_texts(sys.argv[2]); times.append(time.perf_counter() - start)\n"
         "print(round(1000 * statistics.median(times), 1))\n")
for name, table in shapes.items():
    path = os.path.join(tempfile.mkdtemp(), "test.pkl")
    with open(path, "wb") as f:
        pickle.dump(table, f, protocol=5)
    ms = subprocess.run([sys.executable, "-c", timer, args.repo, path], capture_output=True, text=True).stdout.strip()
    print(f"{name:18s} {os.path.getsize(path):>10,} bytes  {ms} ms")
