"""The GPU's costs, counted on a CPU: ops dispatched and host syncs in one training step of a
12-layer model (RoBERTa-base's depth, tiny widths), and the batch shapes of an epoch of AG News
padded as train.micro_batches pads them: exactly (a CPU), to multiples of 8 (a GPU), of 16 (a GPU
with --compile).

    python bench/cpu_proxies.py --data DATA/agnews_dev_train.csv [--tokenizer DIR]

Each op dispatched is roughly one kernel launch on a GPU (fused kernels there make it fewer);
a host sync (`_local_scalar_dense`, `is_nonzero`) stalls the CPU until the GPU catches up. Syncs
are counted apart inside the model's forward: transformers reads, from the 2D attention mask,
whether a batch has padding at all (none under torch.compile, which traces it away).
Lengths come from --tokenizer if given, else from words and marks (+2), close to RoBERTa's.
"""
import argparse
import csv
import json
import os
import re
import sys
from types import SimpleNamespace

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import RobertaConfig, RobertaForSequenceClassification

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import train  # noqa: E402
from lora import inject_lora  # noqa: E402

# train.micro_batches' padding: a batch's width rounded up to a multiple of this, on each device
PADDING = {1: "cpu", 8: "gpu", 16: "gpu --compile"}


class Count(TorchDispatchMode):
    """Ops dispatched, and host syncs inside the model's forward (transformers') or outside it."""
    def __init__(self, model):
        super().__init__()
        self.calls, self.syncs, self.in_forward = {}, {"model": 0, "ours": 0}, False
        model.register_forward_pre_hook(lambda *a: setattr(self, "in_forward", True))
        model.register_forward_hook(lambda *a: setattr(self, "in_forward", False))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.calls[name] = self.calls.get(name, 0) + 1
        if name in ("_local_scalar_dense", "is_nonzero"):
            self.syncs["model" if self.in_forward else "ours"] += 1
        return func(*args, **(kwargs or {}))


def step_counts(batch=32, length=57):
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=12,
                           num_attention_heads=4, intermediate_size=128,
                           max_position_embeddings=514, num_labels=4)
    model = RobertaForSequenceClassification(config)
    inject_lora(model, 2, 4, 0.05, skip=["classifier"])
    model.classifier.requires_grad_(True)
    lengths = np.random.default_rng(0).integers(length // 2, length + 1, batch)
    lengths[0] = length
    ids = np.random.default_rng(1).integers(5, 1000, lengths.sum()).astype(np.int32)
    tokens = data.Tokens(ids, np.concatenate([[0], np.cumsum(lengths)]))
    args = SimpleNamespace(amp_dtype=None, max_grad_norm=1.0, lr=1e-3, weight_decay=0.01,
                           schedule="constant", warmup_ratio=0.0, device=torch.device("cpu"),
                           grad_accum=1, max_length=512, ddp_rank=0, ddp_world=1, compile=False,
                           loss_weight=None)
    optimizer, scheduler, scaler = train.make_optimizer(model, args, 10)
    rows = list(range(batch))
    pieces = list(train.micro_batches(tokens, torch.arange(batch) % 4, rows, 1, args))
    train.train_step(model.train(), pieces, optimizer, scheduler, scaler, args)  # warm-up
    with Count(model) as counted:
        train.train_step(model, pieces, optimizer, scheduler, scaler, args)
    return {"ops_a_step": sum(counted.calls.values()), "host_syncs_a_step": counted.syncs["ours"],
            "host_syncs_in_the_model": counted.syncs["model"],
            "batch": [batch, pieces[0][0].shape[1]]}


def epoch_shapes(path, tokenizer=None):
    with open(path, newline="", encoding="utf-8") as f:
        texts = [row["text"] for row in csv.DictReader(f)]
    if tokenizer:
        from transformers import AutoTokenizer
        tok = data.tokenize(AutoTokenizer.from_pretrained(tokenizer), texts, 512)
        lengths = tok.lengths.tolist()
    else:
        lengths = [min(512, len(re.findall(r"\w+|[^\w\s]", t)) + 2) for t in texts]
    starts = np.concatenate([[0], np.cumsum(lengths)])
    tokens = data.Tokens(np.zeros(sum(lengths), np.int32), starts)
    rows = []
    for multiple, where in PADDING.items():
        batches = data.length_grouped_batches(tokens.lengths, 32, seed=42)
        widths = [data.pad_batch(tokens, b, 1, multiple, 512)[0].shape[1] for b in batches]
        padded = sum(w * len(b) for w, b in zip(widths, batches))
        rows.append({"pad_multiple": multiple, "where": where, "rows": len(texts),
                     "batches": len(batches),
                     "shapes": len(set(widths)), "padding": round(1 - sum(lengths) / padded, 4)})
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--tokenizer", default=None)
    a = p.parse_args()
    print(json.dumps(step_counts()))
    for row in epoch_shapes(a.data, a.tokenizer):
        print(json.dumps(row))
