"""Where a training run's time goes: train.py run as usual, with its phases timed one by one.

    python bench/phases.py [train.py flags]    # e.g. --model $M --data $DATA/agnews_dev_train.csv
                                               #      --limit 4000 --max-length 128 --eval-every 0

Prints, after the run, each wrapped function's calls and seconds, the imports, the whole process,
and the share of the training positions that were padding (over every piece micro_batches made).
Nested phases are counted in their callers too: lora_model holds load_base_model and inject_lora;
micro_batches is a generator, timed while it makes its pieces (pad_batch, the copy to the device),
which happens inside train_step, which holds it; evaluate holds predict_logits, the validation;
save_checkpoint is called by the loop when an evaluation is the best so far.
"""
import atexit
import functools
import inspect
import os
import sys
import time

START = time.perf_counter()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

IMPORTED = time.perf_counter() - START
PHASES = ["start_process", "load_splits", "lora_model", "load_base_model", "inject_lora",
          "tokenize", "make_optimizer", "load_run", "micro_batches", "pad_batch", "to_device",
          "train_step", "evaluate", "predict_logits", "keep_best", "save_checkpoint", "save_run",
          "report"]
totals = {}
positions = {"real": 0, "padded": 0}  # tokens in the attention masks, and every position


def add(name, seconds):
    calls, total = totals.get(name, (0, 0.0))
    totals[name] = (calls + 1, total + seconds)


def timed_pieces(name, pieces):
    """A generator's items, each one's making timed (not the caller's work between them); the
    padding counted from each attention mask (summed on the device: read once, at the end)."""
    spent = 0.0
    while True:
        start = time.perf_counter()
        try:
            piece = next(pieces)
        except StopIteration:
            break
        finally:
            spent += time.perf_counter() - start
        input_ids, attention_mask, _ = piece
        positions["real"] = attention_mask.sum() + positions["real"]
        positions["padded"] += attention_mask.numel()
        yield piece
    add(name, spent)


def timed(name):
    function = getattr(train, name)

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            result = function(*args, **kwargs)
        finally:
            seconds = time.perf_counter() - start
        if inspect.isgenerator(result):  # its work happens as it is consumed
            return timed_pieces(name, result)
        add(name, seconds)
        return result
    return wrapper


def show():
    print(f"{'imports':20s} {'':>5s} {IMPORTED:8.2f} s", file=sys.stderr)
    for name, (calls, seconds) in totals.items():
        print(f"{name:20s} {calls:5d} {seconds:8.2f} s", file=sys.stderr)
    print(f"{'whole process':20s} {'':>5s} {time.perf_counter() - START:8.2f} s", file=sys.stderr)
    if positions["padded"]:
        real = int(positions["real"])
        print(f"padding: {1 - real / positions['padded']:.2%} of {positions['padded']:,} training "
              "positions", file=sys.stderr)


for name in PHASES:
    if hasattr(train, name):  # a phase renamed in train.py is left out, not an error
        setattr(train, name, timed(name))
    else:
        print(f"phases.py: train.py has no {name} now; not timed", file=sys.stderr)
atexit.register(show)
train.main(sys.argv[1:])
