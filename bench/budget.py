"""Where a 1M trainable budget goes: the head, then the adapters' count per unit of rank on each set
of targets, and the largest rank that fits. Computed by lora.py's own functions on the meta device
(the real architectures, no weights, no download).

    python bench/budget.py [--budget 1000000]

Prints one markdown table per model: RoBERTa-base (4 labels) and all-MiniLM-L6-v2 (4 labels).
"""
import argparse
import os
import sys

import torch
from transformers import AutoModelForSequenceClassification, BertConfig, RobertaConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checkpoint import head_of  # noqa: E402
from lora import count_per_rank, largest_rank, target_paths  # noqa: E402

TARGETS = {"query, value (the default, lora.QUERY_VALUE)": None,
           "the four attention projections (query, key, value, attention.output.dense)":
               ["query", "key", "value", "attention.output.dense"],
           "every pretrained Linear (all-linear)": ["all-linear"]}
MODELS = {  # the hub configs of roberta-base and sentence-transformers/all-MiniLM-L6-v2
    "RoBERTa-base": RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                                  num_labels=4),
    "all-MiniLM-L6-v2": BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                                   num_attention_heads=12, intermediate_size=1536, num_labels=4),
}


def table(name, config, budget):
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    head = head_of(model)
    new = [n for n, m in model.named_modules() if m is head]  # load_base_model's task_paths
    head_count = sum(p.numel() for p in head.parameters())
    total = sum(p.numel() for p in model.parameters())
    lines = [f"**{name}**: {total:,} parameters; the new head has **{head_count:,}**, which "
             f"leaves {budget - head_count:,} of {budget:,} for adapters.", "",
             "| targets | layers | per unit of rank | r=2 | largest r under the budget "
             "| trainable at that r |", "|---|---|---|---|---|---|"]
    for label, targets in TARGETS.items():
        paths = target_paths(model, targets, new)
        per_rank = count_per_rank(model, paths)
        r = largest_rank(per_rank, head_count, budget)
        lines.append(f"| {label} | {len(paths)} | {per_rank:,} | {2 * per_rank:,} | {r} "
                     f"| {head_count + r * per_rank:,} |")
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=int, default=1_000_000)
    args = p.parse_args()
    print("\n\n".join(table(name, config, args.budget) for name, config in MODELS.items()))
