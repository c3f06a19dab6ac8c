"""What a training step spends its time on: torch.profiler over --steps real steps (after 3).

    python bench/profile_step.py --model DIR --data DATA/agnews_dev_train.csv [--limit 4000]

The reference run's setup at a small scale: --limit rows, max length 128, r=2 on query and value,
dropout 0.05, the head trained, batch 32, the model in train mode (its own dropout on), on the CPU
in fp32; the model is train.lora_model's and each step is train.py's own (train.micro_batches,
train.train_step, train.make_optimizer), with train.py's defaults for every other flag.
"""
import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from data import length_grouped_batches, load_splits, tokenize  # noqa: E402

p = argparse.ArgumentParser(description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--model", required=True, help="a model folder (or hub name)")
p.add_argument("--data", required=True, help="a text,label CSV")
p.add_argument("--limit", type=int, default=4000)
p.add_argument("--steps", type=int, default=8)
args = p.parse_args()
flags = train.parse_args(["--max-length", "128", "--precision", "fp32", "--model", args.model])
flags.loss_weight = None  # every row alike, as train() sets it without --class-weights
train.start_process(flags)  # rank 0 of 1, as train.py alone
flags.device, flags.amp_dtype = torch.device("cpu"), None  # the CPU profile, even beside a GPU
flags.data, flags.limit = args.data, args.limit
(texts, labels), _, names = load_splits(flags)
model, step_model, tokenizer, _, _ = train.lora_model(flags, names)  # prints where parameters are
tokens, labels = tokenize(tokenizer, texts, flags.max_length), torch.tensor(labels)
optimizer, scheduler, scaler = train.make_optimizer(model, flags, total_steps=10**6)


def step(rows):
    pieces = train.micro_batches(tokens, labels, rows, tokenizer.pad_token_id, flags)
    train.train_step(step_model, pieces, optimizer, scheduler, scaler, flags)


batches = length_grouped_batches(tokens.lengths, flags.batch_size, seed=42)
batches *= 1 + (3 + args.steps) // len(batches)  # few rows: the epoch again
for rows in batches[:3]:
    step(rows)
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for rows in batches[3:3 + args.steps]:
        step(rows)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15,
                                max_name_column_width=40))
