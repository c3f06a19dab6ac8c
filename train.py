"""How we learn: LoRA fine-tuning of a sequence classifier with a plain PyTorch loop.

    python train.py --r 2 --alpha 4 --lr 5e-6          # roberta-base on ag_news
    python train.py --model DIR --data train.csv ...    # local model folder and data file

Every `--eval-every` steps the validation split is scored; the adapter with the best validation
accuracy is saved to `--out` and restored at the end, and training stops after `--patience`
evaluations without improvement.

Several GPUs or machines: the same script under torchrun (DistributedDataParallel, one process each):
    torchrun --nproc_per_node=4 train.py ...
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST --master_port=29500 train.py ...
"""
import argparse
import json
import math
import os
import shlex
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from data import DataError, check_labels, count_classes, length_grouped_batches, load_splits, pad_batch, tokenize
from lora import lora_state_dict, parameter_table
from predict import (ADAPTER_FILE, CONFIG_FILE, build_model, cast_frozen_linears, export_peft, fail,
                     load_tokenizer, model_max_length, pick_device, pick_precision, predict_logits, save_tensors,
                     write_atomically)

LAST_ADAPTER, LAST_STATE = "last_adapter.safetensors", "last_state.pt"  # for --resume
METRICS_FILE = "metrics.jsonl"
RESUMABLE_CHANGES = {"resume", "epochs", "patience", "log_every", "compile", "export_peft"}  # flags --resume may change


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
    p.add_argument("--lr", type=float, default=1e-3, help="constant learning rate of AdamW (see the README's "
                                                          "sweep for why 1e-3)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm; 0 = no clipping")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32, help="training batch; under torchrun the global "
                                                                 "batch, split across the processes")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=512, help="longer texts are truncated")
    p.add_argument("--val-size", type=int, default=640, help="rows split off the data for validation")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--eval-every", type=int, default=200, help="steps between evaluations; 0 = at each "
                                                                "epoch's end")
    p.add_argument("--patience", type=int, default=3, help="evaluations without improvement before stopping")
    p.add_argument("--limit", type=int, default=None, help="use only this many rows of --data (quick runs)")
    p.add_argument("--log-every", type=int, default=50, help="steps between loss reports")
    p.add_argument("--export-peft", metavar="DIR", default=None, help="also write the best adapter in PEFT's "
                                                                    "layout (PeftModel.from_pretrained loads it)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (faster steps on a GPU "
                                                           "after a minute or so of compiling)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out (same flags)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="auto: bf16 where the GPU or CPU runs it in hardware, else fp16 on CUDA, else fp32")
    p.error = fail  # one line, exit code 2
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
    """(mean cross-entropy, accuracy, which rows were right) on a labelled split."""
    logits = predict_logits(model, token_ids, pad_id, batch_size, device, amp_dtype)
    labels = torch.tensor(labels)
    correct = logits.argmax(-1) == labels
    return F.cross_entropy(logits, labels).item(), correct.sum().item() / len(labels), correct


def bootstrap_interval(correct, seed, rounds=2000):
    """95% confidence interval of an accuracy: resample the rows with replacement, take percentiles."""
    rows = torch.randint(len(correct), (rounds, len(correct)), generator=torch.Generator().manual_seed(seed))
    accuracies = correct.float()[rows].mean(dim=1)
    return torch.quantile(accuracies, 0.025).item(), torch.quantile(accuracies, 0.975).item()


def write_metrics(file, **row):
    """One JSON line of metrics.jsonl (a log or an evaluation step)."""
    file.write(json.dumps(row) + "\n")
    file.flush()


def plot_curves(out):
    """curves.png beside metrics.jsonl: training loss and validation accuracy by step (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    with open(os.path.join(out, METRICS_FILE)) as f:
        rows = [json.loads(line) for line in f]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, key, title in [(loss_ax, "train_loss", "training loss"), (acc_ax, "val_accuracy", "validation accuracy")]:
        points = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*points), marker="." if key == "val_accuracy" else None)
        ax.set(title=title, xlabel="step")
    fig.tight_layout()
    path = os.path.join(out, "curves.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class Diverged(RuntimeError):
    """The loss stopped being a finite number."""


def check_finite(value, what, step, args):
    if not math.isfinite(value):
        raise Diverged(f"the {what} became {value} by step {step}; lower --lr (now {args.lr:g}) or use "
                       f"--precision fp32. The best adapter so far is kept in {args.out}")


def broadcast_from_main(obj):
    """The main process's `obj` on every process (torchrun only)."""
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def catch_ctrl_c():
    """An event set by Ctrl-C; the loop checks it between steps, so no step is cut in half.

    A second Ctrl-C stops at once, as usual.
    """
    pressed = threading.Event()

    def handler(signum, frame):
        pressed.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGINT, handler)
    return pressed


def save_checkpoint(out, model, config):
    """The best adapter: the trained tensors (adapters + head) and the config to rebuild the model."""
    os.makedirs(out, exist_ok=True)
    save_tensors(os.path.join(out, ADAPTER_FILE), lora_state_dict(model))
    write_atomically(os.path.join(out, CONFIG_FILE), lambda f: json.dump(config, f, indent=2))


def save_latest(args, model, optimizer, scaler, progress):
    """Everything --resume needs: the latest tensors, optimizer and scaler state, progress, RNG states."""
    os.makedirs(args.out, exist_ok=True)
    save_tensors(os.path.join(args.out, LAST_ADAPTER), lora_state_dict(model), {"step": str(progress["step"])})
    state = {**progress, "args": vars(args), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
             "rng_cpu": torch.get_rng_state(),
             "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    write_atomically(os.path.join(args.out, LAST_STATE), lambda f: torch.save(state, f), mode="wb")


def load_latest(args, model, optimizer, scaler):
    """Load what save_latest wrote into model, optimizer and scaler; returns the progress."""
    adapter_path, state_path = os.path.join(args.out, LAST_ADAPTER), os.path.join(args.out, LAST_STATE)
    if not (os.path.isfile(adapter_path) and os.path.isfile(state_path)):
        raise DataError(f"{args.out}: no saved training state to resume; run without --resume to start afresh")
    try:
        state = torch.load(state_path, weights_only=True)  # plain data and tensors, never code
        with safe_open(adapter_path, "pt") as f:
            saved_step = int(f.metadata()["step"])
        tensors = load_file(adapter_path)
    except Exception as e:
        raise DataError(f"{args.out}: the saved training state is unreadable ({type(e).__name__}); "
                        "run without --resume to start afresh") from None
    if saved_step != state["step"]:
        raise DataError(f"{args.out}: the saved tensors (step {saved_step}) and state (step {state['step']}) "
                        "do not match; run without --resume to start afresh")
    changed = [f"--{k.replace('_', '-')} was {v!r}, now {getattr(args, k)!r}" for k, v in state["args"].items()
               if k not in RESUMABLE_CHANGES and getattr(args, k, None) != v]
    if changed:
        raise DataError(f"--resume needs the flags of the run it continues: {'; '.join(changed)}")
    model.load_state_dict(tensors, strict=False)
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return {k: state[k] for k in ("step", "best_acc", "bad_evals", "stopped")}


def peak_memory(device):
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB GPU"
    try:
        import resource  # Unix only
    except ImportError:
        return "(not measured)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"


def train(args):
    device = pick_device()
    # --- torchrun only: one process per device; a plain `python train.py` has world == 1 ---------
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    distributed = world > 1
    if distributed:
        if args.batch_size < world:
            raise DataError(f"--batch-size {args.batch_size} is the global batch; it must be at least the "
                            f"{world} processes")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
    main_process = rank == 0  # the one that prints, evaluates and writes files
    # -----------------------------------------------------------------------------------------------
    torch.manual_seed(args.seed)  # the same on every process: the same initial adapter and head
    amp_dtype = pick_precision(device, args.precision)

    # data: tokenized once, up front
    (train_texts, train_labels), (val_texts, val_labels), label_names = load_splits(
        args.data, args.val_size, args.seed, args.limit)
    num_labels = args.num_labels or (len(label_names) if label_names else count_classes(train_labels + val_labels,
                                                                                          args.data))
    check_labels(train_labels + val_labels, num_labels, args.data)
    tokenizer = load_tokenizer(args.model)
    limit = model_max_length(tokenizer)
    if args.max_length > limit:
        raise DataError(f"--max-length {args.max_length} is above {args.model}'s limit of {limit} tokens; "
                        f"use --max-length {limit} or less")
    train_ids = tokenize(tokenizer, train_texts, args.max_length)
    val_ids = tokenize(tokenizer, val_texts, args.max_length)
    train_lengths = [len(ids) for ids in train_ids]
    train_labels = torch.tensor(train_labels)
    pad_id = tokenizer.pad_token_id

    # model: pretrained encoder, LoRA on the targets, fresh head
    model = build_model(args.model, num_labels, args.r, args.alpha, args.dropout, args.targets)
    if main_process:
        print(parameter_table(model))
    cast_frozen_linears(model.to(device), amp_dtype)
    # under torchrun, DDP averages the gradients of every process after each backward
    forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if distributed else model
    if args.compile:  # fuses the forward and backward into fewer kernels; the first steps pay for it
        forward = torch.compile(forward, dynamic=True)  # dynamic: every batch has its own length
    trainable = [p for p in model.parameters() if p.requires_grad]
    # decay matrices only: biases have no scale worth shrinking
    groups = [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)  # fp16 needs loss scaling

    config = {"base_model": args.model, "r": args.r, "alpha": args.alpha, "dropout": args.dropout,
              "targets": list(args.targets), "max_length": args.max_length,
              "labels": label_names or [str(i) for i in range(num_labels)]}
    steps_per_epoch = math.ceil(len(train_ids) / args.batch_size)
    if distributed and 0 < len(train_ids) % args.batch_size < world:
        steps_per_epoch -= 1  # a last batch smaller than the process count is dropped (see below)
    eval_every = args.eval_every or steps_per_epoch
    total_steps = steps_per_epoch * args.epochs
    if main_process:
        print(f"{len(train_ids):,} training rows, {len(val_ids):,} validation rows, {total_steps:,} steps "
              f"on {device} ({amp_dtype or 'fp32'})" + (f" x {world} processes" if distributed else ""))

    progress = {"step": 0, "best_acc": -1.0, "bad_evals": 0, "stopped": False}
    best_state = None
    if args.resume:
        progress = load_latest(args, model, optimizer, scaler)
        if progress["best_acc"] >= 0:
            best_state = load_file(os.path.join(args.out, ADAPTER_FILE), device=str(device))
        if main_process:
            print(f"resumed from {args.out} at step {progress['step']} (best val accuracy so far "
                  f"{max(progress['best_acc'], 0):.4f})")

    # under torchrun, Ctrl-C stops every process at once; --resume continues from the last validation
    previous_handler = signal.getsignal(signal.SIGINT)
    ctrl_c = catch_ctrl_c() if not distributed else threading.Event()
    seen_rows = seen_tokens = computed_tokens = 0
    running_loss = torch.zeros((), device=device)
    if main_process:  # a line per log and evaluation step; a resumed run appends to it
        os.makedirs(args.out, exist_ok=True)
        metrics = open(os.path.join(args.out, METRICS_FILE), "a" if args.resume else "w")
    bar = tqdm(total=total_steps, initial=progress["step"], desc="train", dynamic_ncols=True,
               disable=not main_process)
    start = time.perf_counter()
    try:
        for epoch in range(progress["step"] // steps_per_epoch, args.epochs):
            if progress["stopped"] or ctrl_c.is_set():
                break
            batches = length_grouped_batches(train_lengths, args.batch_size, seed=args.seed + epoch)
            batches = [b for b in batches if len(b) >= world]  # every process needs a row or more
            model.train()
            # on resume, skip the batches of this epoch that were already trained on
            for global_rows in batches[progress["step"] - epoch * steps_per_epoch:]:
                rows = global_rows[rank::world]  # this process's share of the batch (all of it if world == 1)
                input_ids, attention_mask = pad_batch([train_ids[i] for i in rows], pad_id)
                labels = train_labels[rows]
                seen_tokens += sum(train_lengths[i] for i in rows)
                computed_tokens += input_ids.numel()
                if device.type == "cuda":  # pinned memory lets the copy overlap with the GPU's work
                    input_ids, attention_mask, labels = (t.pin_memory() for t in (input_ids, attention_mask, labels))
                input_ids, attention_mask, labels = (t.to(device, non_blocking=True)
                                                     for t in (input_ids, attention_mask, labels))
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = forward(input_ids=input_ids, attention_mask=attention_mask).logits
                loss = F.cross_entropy(logits.float(), labels)
                if distributed:  # DDP averages over processes; weigh each by its share of the global batch
                    loss = loss * len(rows) * world / len(global_rows)
                scaler.scale(loss).backward()
                if args.max_grad_norm > 0:
                    scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
                    torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)

                step = progress["step"] = progress["step"] + 1
                seen_rows += len(rows)
                running_loss += loss.detach()  # stays on the device: no sync every step
                bar.update()
                if step % args.log_every == 0:
                    train_loss = running_loss.item() / args.log_every
                    check_finite(train_loss, "training loss", step, args)
                    bar.set_postfix(loss=f"{train_loss:.4f}")
                    if main_process:
                        write_metrics(metrics, step=step, epoch=round(step / steps_per_epoch, 3),
                                      train_loss=train_loss, lr=optimizer.param_groups[0]["lr"],
                                      elapsed_s=round(time.perf_counter() - start, 2))
                    running_loss.zero_()
                evaluate_now = step % eval_every == 0 or step == total_steps
                if evaluate_now and main_process:
                    val_loss, val_acc, _ = evaluate(model, val_ids, val_labels, pad_id, args.eval_batch_size,
                                                    device, amp_dtype)
                    check_finite(val_loss, "validation loss", step, args)
                    write_metrics(metrics, step=step, epoch=round(step / steps_per_epoch, 3), val_loss=val_loss,
                                  val_accuracy=val_acc, elapsed_s=round(time.perf_counter() - start, 2))
                    model.train()
                    improved = val_acc > progress["best_acc"]
                    tqdm.write(f"step {step}: val loss {val_loss:.4f}, val accuracy {val_acc:.4f}"
                               + (" (best so far, saved)" if improved else ""))
                    if improved:
                        progress.update(best_acc=val_acc, bad_evals=0)
                        best_state = {n: t.detach().clone() for n, t in lora_state_dict(model).items()}
                        save_checkpoint(args.out, model, {**config, "best_val_accuracy": val_acc, "step": step})
                    else:
                        progress["bad_evals"] += 1
                        progress["stopped"] = progress["bad_evals"] >= args.patience
                    save_latest(args, model, optimizer, scaler, progress)
                if evaluate_now and distributed:
                    progress = broadcast_from_main(progress)  # every process takes the same decision
                if progress["stopped"]:
                    if main_process:
                        tqdm.write(f"early stop: no better validation accuracy in {args.patience} evaluations")
                    break
                if ctrl_c.is_set():
                    break
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        bar.close()
        if main_process:
            metrics.close()
    if ctrl_c.is_set():
        save_latest(args, model, optimizer, scaler, progress)
        argv = sys.argv[1:] + ([] if "--resume" in sys.argv else ["--resume"])
        print(f"interrupted at step {progress['step']}; the latest state is saved in {args.out}. Resume with:\n"
              f"  python train.py {shlex.join(argv)}")
        sys.exit(130)
    elapsed = time.perf_counter() - start
    if distributed:
        dist.destroy_process_group()
        if not main_process:
            return model, progress["best_acc"]

    model.load_state_dict(best_state, strict=False)
    val_loss, val_acc, correct = evaluate(model, val_ids, val_labels, pad_id, args.eval_batch_size, device, amp_dtype)
    low, high = bootstrap_interval(correct, args.seed)
    print(f"restored the best adapter: val loss {val_loss:.4f}, val accuracy {val_acc:.4f} "
          f"(95% bootstrap interval {low:.4f}-{high:.4f}, {len(correct)} rows) -> {args.out}")
    if args.export_peft:
        export_peft(args.out, args.export_peft)
        print(f"PEFT adapter: {args.export_peft}")
    curves = plot_curves(args.out)
    print(f"metrics: {os.path.join(args.out, METRICS_FILE)}" + (f", curves: {curves}" if curves else
                                                                 " (pip install matplotlib for curves.png)"))
    if seen_rows:
        print(f"{elapsed:.1f} s training, {world * seen_rows / elapsed:.1f} samples/s, "
              f"{world * seen_tokens / elapsed:,.0f} tokens/s, "
              f"{1 - seen_tokens / computed_tokens:.1%} of positions were padding, peak {peak_memory(device)}")
    return model, val_acc


def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    except DataError as e:
        fail(str(e))
    except Diverged as e:
        fail(str(e), code=1)


if __name__ == "__main__":
    main()
