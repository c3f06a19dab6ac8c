"""Memory and time of tokenizing N rows, before (Python lists) and after (data.Tokens), and with the cache.

    python bench/memory.py --model DIR [--rows 10000 100000 1000000]

Each measurement runs in a fresh process (peak RSS is per process): AG News texts from
../shared/data/agnews_dev_train.csv repeated to N rows, max length 128.
"""
import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CHILD = r"""
import csv, json, os, resource, sys, time
sys.path.insert(0, sys.argv[1])
import data
from transformers import AutoTokenizer
kind, model, rows, source = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
with open(source) as f:
    base = [r["text"] for r in csv.DictReader(f)]
texts = [base[i % len(base)] + ("" if i < len(base) else f" {i}") for i in range(rows)]  # distinct texts
tokenizer = AutoTokenizer.from_pretrained(model)
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
before, start = rss(), time.perf_counter()
if kind == "lists":  # the old way: all at once, Python lists of ints
    ids = tokenizer(texts, truncation=True, max_length=128)["input_ids"]
    tokens = sum(map(len, ids))
else:
    ids = data.tokenize(tokenizer, texts, 128, cache=kind != "nocache")
    tokens = int(ids.lengths.sum())
seconds = time.perf_counter() - start
print(json.dumps({"kind": kind, "rows": rows, "tokens": tokens, "seconds": round(seconds, 2),
                  "resident_bytes_per_token": round((rss() - before) / tokens, 2),
                  "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}))
"""


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--kinds", nargs="+", default=["lists", "nocache", "cache-first", "cache-second"],
                   help="lists: the old Python lists (about 240 bytes a token: leave it out at 1M rows)")
    p.add_argument("--data", default=os.path.join(HERE, "..", "..", "shared", "data", "agnews_dev_train.csv"))
    args = p.parse_args()
    env = {**os.environ, "XDG_CACHE_HOME": os.path.join(os.environ.get("TMPDIR", "/tmp"), "lora-bench-cache")}
    for rows in args.rows:
        for kind in args.kinds:
            if kind == "cache-first":
                subprocess.run(["rm", "-rf", env["XDG_CACHE_HOME"]])
            out = subprocess.run([sys.executable, "-c", CHILD, os.path.join(HERE, ".."), kind, args.model, str(rows),
                                  args.data], capture_output=True, text=True, env=env)
            print(out.stdout.strip() or out.stderr[-500:], flush=True)


if __name__ == "__main__":
    main()
