"""Memory and time of tokenizing N rows: as Python lists of ints (the old way) and as data.Tokens.

    python bench/memory.py --model DIR --data DATA/agnews_dev_train.csv [--rows 10000 100000]

Each measurement runs in a fresh process (peak RSS is per process): the texts of --data (a
text,label CSV) repeated to N distinct rows, max length 128. One JSON line each.
"""
import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = r"""
import csv, json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import data
from transformers import AutoTokenizer
kind, model, rows, source = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
with open(source, newline="") as f:
    base = [r["text"] for r in csv.DictReader(f)]
texts = [base[i % len(base)] + ("" if i < len(base) else f" {i}") for i in range(rows)]
tokenizer = AutoTokenizer.from_pretrained(model)
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
before, start = rss(), time.perf_counter()
if kind == "lists":  # all at once, Python lists of ints
    ids = tokenizer(texts, truncation=True, max_length=128)["input_ids"]
    tokens = sum(map(len, ids))
else:
    ids = data.tokenize(tokenizer, texts, 128)
    tokens = int(ids.lengths.sum())
seconds = time.perf_counter() - start
print(json.dumps({"kind": kind, "rows": rows, "tokens": tokens, "seconds": round(seconds, 2),
                  "resident_bytes_per_token": round((rss() - before) / tokens, 2),
                  "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                                        3)}))
"""


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a model folder with a fast tokenizer")
    p.add_argument("--data", required=True, help="a text,label CSV")
    p.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--kinds", nargs="+", choices=["lists", "tokens"], default=["lists", "tokens"],
                   help="lists: about 240 bytes a token (leave it out at 1M rows)")
    args = p.parse_args()
    for rows in args.rows:
        for kind in args.kinds:
            out = subprocess.run([sys.executable, "-c", CHILD, ROOT, kind, args.model, str(rows),
                                  args.data], capture_output=True, text=True)
            print(out.stdout.strip() or out.stderr[-500:], flush=True)


if __name__ == "__main__":
    main()
