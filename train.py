"""How we learn: LoRA fine-tuning of a sequence classifier with a plain PyTorch loop.

    python train.py --r 2 --alpha 4 --lr 5e-6          # roberta-base on ag_news
    python train.py --model DIR --data train.csv ...    # local model folder and data file

Every `--eval-every` steps the validation split is scored; the adapter with the best validation
accuracy is saved to `--out` and restored at the end, and training stops after `--patience`
evaluations without improvement.
"""
import argparse
import json
import math
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save as safetensors_bytes
from tqdm import tqdm
from transformers import AutoTokenizer

from data import DataError, check_labels, length_grouped_batches, load_splits, pad_batch, tokenize
from lora import lora_state_dict, parameter_table
from predict import (ADAPTER_FILE, CONFIG_FILE, build_model, cast_frozen_linears, pick_device, pick_precision,
                     predict_logits, write_atomically)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="roberta-base", help="hub name or local folder of the base model")
    p.add_argument("--data", default="ag_news", help="hub dataset name, or .csv/.jsonl/.parquet/.pkl file "
                                                     "or save_to_disk folder with text,label columns")
    p.add_argument("--out", default="checkpoint", help="folder for the best adapter and its config")
    p.add_argument("--num-labels", type=int, default=None, help="default: from the data")
    # LoRA
    p.add_argument("--r", type=int, default=2, help="rank of the update B @ A")
    p.add_argument("--alpha", type=float, default=4.0, help="the update is scaled by alpha / r")
    p.add_argument("--dropout", type=float, default=0.05, help="dropout on the adapter's input")
    p.add_argument("--targets", nargs="+", default=["query", "value"], help="Linear layers to adapt")
    # optimisation
    p.add_argument("--lr", type=float, default=5e-4, help="constant learning rate of AdamW")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm; 0 = no clipping")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=512, help="longer texts are truncated")
    p.add_argument("--val-size", type=int, default=640, help="rows split off the data for validation")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--eval-every", type=int, default=200, help="steps between evaluations; 0 = at each "
                                                                "epoch's end")
    p.add_argument("--patience", type=int, default=3, help="evaluations without improvement before stopping")
    p.add_argument("--limit", type=int, default=None, help="use only this many rows of --data (quick runs)")
    p.add_argument("--log-every", type=int, default=50, help="steps between loss reports")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="auto: bf16 where the GPU or CPU runs it in hardware, else fp16 on CUDA, else fp32")
    args = p.parse_args(argv)
    for flag, value, low in [("--r", args.r, 1), ("--epochs", args.epochs, 1), ("--batch-size", args.batch_size, 1),
                             ("--eval-batch-size", args.eval_batch_size, 1), ("--max-length", args.max_length, 2),
                             ("--patience", args.patience, 1), ("--log-every", args.log_every, 1),
                             ("--eval-every", args.eval_every, 0)]:
        if value < low:
            p.error(f"{flag} must be at least {low}, got {value}")
    if not args.lr > 0:
        p.error(f"--lr must be positive, got {args.lr}")
    if not 0 <= args.dropout < 1:
        p.error(f"--dropout must be in [0, 1), got {args.dropout}")
    return args


def evaluate(model, token_ids, labels, pad_id, batch_size, device, amp_dtype):
    """(mean cross-entropy, accuracy) on a labelled split."""
    logits = predict_logits(model, token_ids, pad_id, batch_size, device, amp_dtype)
    labels = torch.tensor(labels)
    return F.cross_entropy(logits, labels).item(), (logits.argmax(-1) == labels).sum().item() / len(labels)


def save_checkpoint(out, model, config):
    """The trained tensors (adapters + head) as safetensors, and the config to rebuild the model."""
    os.makedirs(out, exist_ok=True)
    tensors = {n: t.detach().to("cpu", copy=True).contiguous() for n, t in lora_state_dict(model).items()}
    write_atomically(os.path.join(out, ADAPTER_FILE), lambda f: f.write(safetensors_bytes(tensors)), mode="wb")
    write_atomically(os.path.join(out, CONFIG_FILE), lambda f: json.dump(config, f, indent=2))


def peak_memory(device):
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB GPU"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"


def train(args):
    torch.manual_seed(args.seed)
    device = pick_device()
    amp_dtype = pick_precision(device, args.precision)

    # data: tokenized once, up front
    (train_texts, train_labels), (val_texts, val_labels), label_names = load_splits(
        args.data, args.val_size, args.seed, args.limit)
    num_labels = args.num_labels or (len(label_names) if label_names else max(train_labels + val_labels) + 1)
    check_labels(train_labels + val_labels, num_labels, args.data)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    train_ids = tokenize(tokenizer, train_texts, args.max_length)
    val_ids = tokenize(tokenizer, val_texts, args.max_length)
    train_lengths = [len(ids) for ids in train_ids]
    train_labels = torch.tensor(train_labels)
    pad_id = tokenizer.pad_token_id

    # model: pretrained encoder, LoRA on the targets, fresh head
    model = build_model(args.model, num_labels, args.r, args.alpha, args.dropout, args.targets)
    print(parameter_table(model))
    cast_frozen_linears(model.to(device), amp_dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # decay matrices only: biases and norms have no scale worth shrinking
    groups = [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)  # fp16 needs loss scaling

    config = {"base_model": args.model, "r": args.r, "alpha": args.alpha, "dropout": args.dropout,
              "targets": list(args.targets), "max_length": args.max_length,
              "labels": label_names or [str(i) for i in range(num_labels)]}
    steps_per_epoch = math.ceil(len(train_ids) / args.batch_size)
    eval_every = args.eval_every or steps_per_epoch
    total_steps = steps_per_epoch * args.epochs
    print(f"{len(train_ids):,} training rows, {len(val_ids):,} validation rows, {total_steps:,} steps "
          f"on {device} ({amp_dtype or 'fp32'})")

    best_acc, best_state, bad_evals, step, stop = -1.0, None, 0, 0, False
    seen_rows = seen_tokens = computed_tokens = 0
    running_loss = torch.zeros((), device=device)
    bar = tqdm(total=total_steps, desc="train", dynamic_ncols=True)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        batches = length_grouped_batches(train_lengths, args.batch_size, seed=args.seed + epoch)
        model.train()
        for rows in batches:
            input_ids, attention_mask = pad_batch([train_ids[i] for i in rows], pad_id)
            labels = train_labels[rows]
            seen_tokens += sum(train_lengths[i] for i in rows)
            computed_tokens += input_ids.numel()
            if device.type == "cuda":  # pinned memory lets the copy overlap with the GPU's work
                input_ids, attention_mask, labels = (t.pin_memory() for t in (input_ids, attention_mask, labels))
            input_ids, attention_mask, labels = (t.to(device, non_blocking=True)
                                                 for t in (input_ids, attention_mask, labels))
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            loss = F.cross_entropy(logits.float(), labels)
            scaler.scale(loss).backward()
            if args.max_grad_norm > 0:
                scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
                torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

            step += 1
            seen_rows += len(rows)
            running_loss += loss.detach()  # stays on the device: no sync every step
            bar.update()
            if step % args.log_every == 0:
                bar.set_postfix(loss=f"{running_loss.item() / args.log_every:.4f}")
                running_loss.zero_()
            if step % eval_every == 0 or step == total_steps:
                val_loss, val_acc = evaluate(model, val_ids, val_labels, pad_id, args.eval_batch_size,
                                             device, amp_dtype)
                model.train()
                improved = val_acc > best_acc
                tqdm.write(f"step {step}: val loss {val_loss:.4f}, val accuracy {val_acc:.4f}"
                           + (" (best so far, saved)" if improved else ""))
                if improved:
                    best_acc, bad_evals = val_acc, 0
                    best_state = {n: t.detach().clone() for n, t in lora_state_dict(model).items()}
                    save_checkpoint(args.out, model, {**config, "best_val_accuracy": val_acc, "step": step})
                else:
                    bad_evals += 1
                    stop = bad_evals >= args.patience
            if stop:
                tqdm.write(f"early stop: no better validation accuracy in {args.patience} evaluations")
                break
        if stop:
            break
    bar.close()
    elapsed = time.perf_counter() - start

    model.load_state_dict(best_state, strict=False)
    val_loss, val_acc = evaluate(model, val_ids, val_labels, pad_id, args.eval_batch_size, device, amp_dtype)
    print(f"restored the best adapter: val loss {val_loss:.4f}, val accuracy {val_acc:.4f} -> {args.out}")
    print(f"{elapsed:.1f} s training, {seen_rows / elapsed:.1f} samples/s, {seen_tokens / elapsed:,.0f} tokens/s, "
          f"{1 - seen_tokens / max(computed_tokens, 1):.1%} of positions were padding, peak {peak_memory(device)}")
    return model, val_acc


def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
