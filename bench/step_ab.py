"""A training step with the attention mask in 2D or in SDPA's 4D form, and AdamW foreach or fused:
the median ms a step of each of the four (24 length-grouped batches of 32, max length 128, fp32,
the first 4 not counted), twice.

    python bench/step_ab.py --model MINILM_DIR --data DATA/agnews_dev_train.csv
"""
import argparse
import csv
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint  # noqa: E402
import data  # noqa: E402
import train  # noqa: E402
from lora import inject_lora  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--model", required=True)
p.add_argument("--data", required=True)
a = p.parse_args()
with open(a.data, newline="", encoding="utf-8") as f:
    texts = [row["text"] for row in csv.DictReader(f)][:2000]
model, tokenizer, new = checkpoint.load_base_model(a.model, 4)
inject_lora(model, 2, 4, 0.05, skip=new)
for path in new:
    model.get_submodule(path).requires_grad_(True)
model.train()
tokens = data.tokenize(tokenizer, texts, 128)
batches = data.length_grouped_batches(tokens.lengths, 32, 42)[:24]
labels = torch.arange(len(texts)) % 4


def median_ms(mask4d, fused):
    args = SimpleNamespace(amp_dtype=None, max_grad_norm=1.0, lr=1e-3, weight_decay=0.01,
                           schedule="constant", warmup_ratio=0.0, device=torch.device("cpu"))
    optimizer, scheduler, scaler = train.make_optimizer(model, args, 100)
    if not fused:
        optimizer = torch.optim.AdamW(optimizer.param_groups, lr=1e-3)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    times = []
    for rows in batches:
        ids, mask = data.pad_batch(tokens, rows, tokenizer.pad_token_id)
        mask = mask[:, None, None, :].bool() if mask4d else mask
        start = time.perf_counter()
        train.train_step(model, [(ids, mask, labels[rows], 1.0)], optimizer, scheduler, scaler, args)
        times.append(time.perf_counter() - start)
    return statistics.median(times[4:]) * 1000


for rep in range(2):
    for mask4d in (False, True):
        for fused in (False, True):
            print(f"run {rep + 1}: mask {'4d' if mask4d else '2d'}, AdamW "
                  f"{'fused' if fused else 'foreach'}: {median_ms(mask4d, fused):.1f} ms a step")
