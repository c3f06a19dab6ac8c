"""What a training step spends its time on: torch.profiler over 8 real steps (after 3 to warm up).

    python bench/profile_step.py --model DIR [--data ../shared/data/agnews_dev_train.csv]

The reference run's setup at a small scale: 4,000 rows, max length 128, r=2 on query and value,
dropout 0.05, batch 32, the model in train mode (its own dropout on), on the CPU in fp32.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checkpoint import head_of, load_base_model, load_tokenizer, made_for_the_task  # noqa: E402
from data import length_grouped_batches, load_splits, pad_batch, tokenize  # noqa: E402
from lora import inject_lora  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                              "agnews_dev_train.csv"))
args = p.parse_args()
(texts, labels), _, _ = load_splits(args.data, 640, 42, 4000)
tokenizer = load_tokenizer(args.model)
tokens, labels = tokenize(tokenizer, texts, 128, cache=False), torch.tensor(labels)
model, new = load_base_model(args.model, 4)
inject_lora(model, 2, 4, 0.05, ["query", "value"], made_for_the_task(model, new))
head_of(model).requires_grad_(True)
model.train()
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)


def step(rows):
    input_ids, attention_mask = pad_batch(tokens, rows, tokenizer.pad_token_id)
    loss = F.cross_entropy(model(input_ids=input_ids, attention_mask=attention_mask).logits, labels[rows])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


batches = length_grouped_batches(tokens.lengths, 32, seed=42)
for rows in batches[:3]:
    step(rows)
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for rows in batches[3:11]:
        step(rows)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40))
