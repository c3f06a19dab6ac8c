"""Where a training run's time goes: train.py run as usual, with its phases timed one by one.

    python bench/phases.py [train.py flags]    # e.g. --model $M --data $DATA/agnews_dev_train.csv
                                               #      --limit 4000 --max-length 128 --eval-every 0

Prints, after the run, each wrapped function's calls and seconds, the imports, and the whole
process. Nested phases are counted in their callers too: lora_model holds load_base_model,
inject_lora and cast_frozen_linears; micro_batches holds pad_batch; evaluate, the validation.
"""
import atexit
import functools
import os
import sys
import time

START = time.perf_counter()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

IMPORTED = time.perf_counter() - START
PHASES = ["load_splits", "lora_model", "load_base_model", "inject_lora", "cast_frozen_linears",
          "tokenize", "make_optimizer", "load_run", "micro_batches", "pad_batch", "train_step",
          "evaluate", "keep_best", "save_run", "report"]
totals = {}


def timed(name):
    function = getattr(train, name)

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            calls, seconds = totals.get(name, (0, 0.0))
            totals[name] = (calls + 1, seconds + time.perf_counter() - start)
    return wrapper


def show():
    print(f"{'imports':20s} {'':>5s} {IMPORTED:8.2f} s", file=sys.stderr)
    for name, (calls, seconds) in totals.items():
        print(f"{name:20s} {calls:5d} {seconds:8.2f} s", file=sys.stderr)
    print(f"{'whole process':20s} {'':>5s} {time.perf_counter() - START:8.2f} s", file=sys.stderr)


for name in PHASES:
    if hasattr(train, name):  # a phase renamed in train.py is left out, not an error
        setattr(train, name, timed(name))
    else:
        print(f"phases.py: train.py has no {name} now; not timed", file=sys.stderr)
atexit.register(show)
train.main(sys.argv[1:])
