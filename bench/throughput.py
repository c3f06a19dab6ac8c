"""Training speed and memory of a RoBERTa-base-shaped model (random weights, built from a config: no
download): tokens/s and peak memory of train.py's own train_step at batch 32, max length 512.

    python bench/throughput.py --precision bf16 [--steps 20] [--compile] [--tiny]

Prints one JSON line. LoRA r=2 on query and value plus the head, as the reference run; every batch is
full length (512 tokens a row), the worst case dynamic padding ever meets.
"""
import argparse
import json
import os
import sys
import time
from types import SimpleNamespace

import torch
from transformers import RobertaConfig, RobertaForSequenceClassification

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from lora import inject_lora  # noqa: E402
from predict import cast_frozen_linears, pick_device, pick_precision  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
p.add_argument("--batch-size", type=int, default=32)
p.add_argument("--max-length", type=int, default=512)
p.add_argument("--steps", type=int, default=20)
p.add_argument("--warmup", type=int, default=5)
p.add_argument("--compile", action="store_true")
p.add_argument("--tiny", action="store_true", help="a tiny config, for a dry run on a CPU")
args = p.parse_args()

device = pick_device()
config = RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,  # roberta-base:
                       bos_token_id=0, eos_token_id=2, num_labels=4,  # positions start after the padding id, 2..513
                       **(dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
                          if args.tiny else {}))
torch.manual_seed(0)
model = RobertaForSequenceClassification(config)
inject_lora(model, r=2, alpha=4, dropout=0.05, targets=["query", "value"], skip={"classifier.dense"})
model.classifier.requires_grad_(True)
run = SimpleNamespace(amp_dtype=pick_precision(device, args.precision), max_grad_norm=1.0, lr=1e-3, weight_decay=0.01,
                      schedule="constant", warmup_ratio=0.0, device=device)
model = cast_frozen_linears(model.to(device), run.amp_dtype).train()
step_model = torch.compile(model, dynamic=True) if args.compile else model
optimizer, scheduler, scaler = train.make_optimizer(model, run, total_steps=args.warmup + args.steps)
ids = torch.randint(3, config.vocab_size, (args.batch_size, args.max_length), device=device)
batch = (ids, torch.ones_like(ids), torch.randint(0, 4, (args.batch_size,), device=device))

sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
for _ in range(args.warmup):
    train.train_step(step_model, batch, optimizer, scheduler, scaler, run)
sync()
if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
start = time.perf_counter()
for _ in range(args.steps):
    loss = train.train_step(step_model, batch, optimizer, scheduler, scaler, run)
sync()
seconds = time.perf_counter() - start
peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
print(json.dumps({"model": "roberta-base shape" if not args.tiny else "tiny", "precision": args.precision,
                  "compile": args.compile, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  "batch": args.batch_size, "length": args.max_length, "steps": args.steps,
                  "step_ms": round(1000 * seconds / args.steps, 1),
                  "tokens_per_s": round(args.batch_size * args.max_length * args.steps / seconds),
                  "peak_gib": round(peak, 2), "loss": round(loss.item(), 4)}))
