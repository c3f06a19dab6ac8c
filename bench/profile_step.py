"""What a training step spends its time on: torch.profiler over --steps real steps (after 3).

    python bench/profile_step.py --model DIR --data DATA/agnews_dev_train.csv [--limit 4000]

The reference run's setup at a small scale: --limit rows, max length 128, r=2 on query and value,
dropout 0.05, the head trained, batch 32, the model in train mode (its own dropout on), on the CPU
in fp32; each step is train.py's own (train.micro_batches, train.train_step, make_optimizer).
"""
import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from checkpoint import load_base_model  # noqa: E402
from data import length_grouped_batches, load_splits, tokenize  # noqa: E402
from lora import inject_lora  # noqa: E402

p = argparse.ArgumentParser(description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--model", required=True, help="a model folder (or hub name)")
p.add_argument("--data", required=True, help="a text,label CSV")
p.add_argument("--limit", type=int, default=4000)
p.add_argument("--steps", type=int, default=8)
args = p.parse_args()
flags = train.parse_args(["--max-length", "128", "--precision", "fp32", "--model", args.model])
run = train.Run(flags)  # train.py's: the padding, the copies to the device
run.device, run.amp_dtype, run.pad_to = torch.device("cpu"), None, 1
flags.device, flags.amp_dtype = run.device, run.amp_dtype  # as train.train sets them
(texts, labels), _, _ = load_splits(args.data, 640, 42, args.limit)
model, tokenizer, new = load_base_model(args.model, 4, flags.max_length)
inject_lora(model, 2, 4, 0.05, ["query", "value"], skip=new)
for path in new:
    model.get_submodule(path).requires_grad_(True)
model.train()
tokens, labels = tokenize(tokenizer, texts, flags.max_length), torch.tensor(labels)
optimizer, scheduler, scaler = train.make_optimizer(model, flags, total_steps=10**6)


def step(rows):
    pieces = train.micro_batches(tokens, labels, rows, tokenizer.pad_token_id, run, flags)
    train.train_step(model, pieces, optimizer, scheduler, scaler, flags)


batches = length_grouped_batches(tokens.lengths, flags.batch_size, seed=42)
batches *= 1 + (3 + args.steps) // len(batches)  # few rows: the epoch again
for rows in batches[:3]:
    step(rows)
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for rows in batches[3:3 + args.steps]:
        step(rows)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15,
                                max_name_column_width=40))
