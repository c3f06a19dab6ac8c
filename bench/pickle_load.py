"""How long `data.read_texts` takes on a --rows-row test.pkl (8,000) of three shapes: medians of
5, after a warm-up.

    python bench/pickle_load.py [--repo DIR] [--rows 8000]   # DIR: another checkout, e.g. an
                                                             # older commit's worktree

Each shape is timed in a fresh process that imports `data` from --repo (default: this checkout),
so the figure includes whatever that release does: reading in-process, or in a child process.
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

p = argparse.ArgumentParser(description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
p.add_argument("--rows", type=int, default=8000)
args = p.parse_args()
words = ["alpha", "beta", "gamma", "delta", "news", "market"]
rows = [" ".join(random.Random(i).choice(words) for _ in range(40)) for i in range(args.rows)]
shapes = {"Dataset": datasets.Dataset.from_dict({"text": rows}),
          "DataFrame": pd.DataFrame({"text": rows, "label": [1] * len(rows)}),
          "list of row dicts": [{"text": t, "label": 1} for t in rows]}
timer = ("import statistics, sys, time; sys.path.insert(0, sys.argv[1]); import data\n"
         "data.read_texts(sys.argv[2])\n"
         "times = []\n"
         "for _ in range(5):\n"
         "    start = time.perf_counter(); data.read_texts(sys.argv[2])\n"
         "    times.append(time.perf_counter() - start)\n"
         "print(round(1000 * statistics.median(times), 1))\n")
for name, table in shapes.items():
    folder = tempfile.TemporaryDirectory()
    path = os.path.join(folder.name, "test.pkl")
    with open(path, "wb") as f:
        pickle.dump(table, f, protocol=5)
    done = subprocess.run([sys.executable, "-c", timer, args.repo, path], capture_output=True,
                          text=True)
    ms = done.stdout.strip() or f"failed: {done.stderr.strip()[-300:]}"
    print(f"{name:18s} {os.path.getsize(path):>10,} bytes  {ms} ms")
    folder.cleanup()
