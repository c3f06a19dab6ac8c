"""A training step with AdamW fused (what train.make_optimizer takes) or foreach: the median ms a
step of each (24 length-grouped batches of 32 from the first 2,000 rows, max length 128, fp32 on
the CPU, the first 4 not counted), twice, alternating.

    python bench/step_ab.py --model MINILM_DIR --data DATA/agnews_dev_train.csv

The model is train.lora_model's (train.py's defaults: r=2 on query and value, the head trained),
each step train.micro_batches and train.train_step; each measurement starts a fresh optimizer (the
model goes on training across them, which changes what a step computes, not what it costs). The
attention mask is the 2D one, the only one the code has now.
"""
import argparse
import csv
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import train  # noqa: E402

p = argparse.ArgumentParser(description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--model", required=True)
p.add_argument("--data", required=True, help="a text,label CSV")
a = p.parse_args()
with open(a.data, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))[:2000]
texts, labels = [r["text"] for r in rows], torch.tensor([int(r["label"]) for r in rows])
args = train.parse_args(["--model", a.model, "--max-length", "128", "--precision", "fp32"])
args.loss_weight = None  # every row alike, as train() sets it without --class-weights
train.start_process(args)  # rank 0 of 1, as train.py alone
args.device, args.amp_dtype = torch.device("cpu"), None  # the CPU's figure, even beside a GPU
model, step_model, tokenizer, _, _ = train.lora_model(args, [str(k) for k in range(4)])
tokens = data.tokenize(tokenizer, texts, args.max_length)
batches = data.length_grouped_batches(tokens.lengths, 32, 42)[:24]


def optimizer_for(fused):
    """train.make_optimizer's AdamW (fused), or the same groups in a foreach AdamW; a constant
    rate either way. A group carries its `fused` flag: the foreach one gets fresh groups."""
    optimizer, scheduler, scaler = train.make_optimizer(model, args, 100)
    if not fused:
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]}
                  for g in optimizer.param_groups]
        optimizer = torch.optim.AdamW(groups, lr=args.lr, foreach=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    assert all(bool(g["fused"]) == fused for g in optimizer.param_groups)
    return optimizer, scheduler, scaler


def median_ms(fused):
    optimizer, scheduler, scaler = optimizer_for(fused)
    times = []
    for rows in batches:
        pieces = train.micro_batches(tokens, labels, rows, tokenizer.pad_token_id, args)
        start = time.perf_counter()
        train.train_step(step_model, pieces, optimizer, scheduler, scaler, args)
        times.append(time.perf_counter() - start)
    return statistics.median(times[4:]) * 1000


for rep in range(2):
    for fused in (False, True):
        print(f"run {rep + 1}: AdamW {'fused' if fused else 'foreach'}: "
              f"{median_ms(fused):.1f} ms a step", flush=True)
