"""How we learn: LoRA fine-tuning of a sequence classifier with a plain PyTorch loop.

    python train.py --r 2 --alpha 4 --lr 5e-6          # roberta-base on ag_news
    python train.py --model DIR --data train.csv ...    # a local model folder and data file

The method, as `train()` reads: tokenize the texts once; load the pretrained encoder with a new
classification head and put LoRA adapters on its `query` and `value` layers, freezing everything
else; then, batch after batch, one AdamW step on the cross-entropy, the learning rate following
its schedule. Every --eval-every steps the validation split is scored: a better accuracy saves
the adapter, --patience evaluations without one end the run. At the end the best adapter is put
back and scored once more, per class.

Several GPUs or machines: the same script under torchrun (DistributedDataParallel, one process each):
    torchrun --nproc_per_node=4 train.py ...
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

from data import (DataError, check_labels, count_classes, length_grouped_batches, load_splits, pad_batch, tokenize,
                  write_atomically)
from lora import TargetError, inject_lora, largest_rank, lora_state_dict, parameter_table
from predict import (ADAPTER_FILE, CONFIG_FILE, cast_frozen_linears, class_report, confusion_matrix, export_peft,
                     fail, load_base_model, load_tokenizer, model_max_length, pick_device, pick_precision,
                     plot_confusion, predict_logits, save_tensors)


def train_step(model, batch, optimizer, scheduler, scaler, args, loss_share=1.0):
    """One step of the method: forward under autocast, cross-entropy, backward, clip, AdamW, schedule."""
    input_ids, attention_mask, labels = batch
    with torch.autocast(input_ids.device.type, dtype=args.amp_dtype, enabled=args.amp_dtype is not None):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    loss = F.cross_entropy(logits.float(), labels) * loss_share  # this process's share of the batch (torchrun)
    scaler.scale(loss).backward()  # the scaler only scales in fp16, where small gradients would vanish
    if args.max_grad_norm > 0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], args.max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def evaluate(model, tokens, labels, pad_id, args):
    """(mean cross-entropy, accuracy, predicted classes) on a labelled split."""
    logits = predict_logits(model, tokens, pad_id, args.eval_batch_size, args.device, args.amp_dtype)
    predicted = logits.argmax(-1)
    return F.cross_entropy(logits, labels).item(), (predicted == labels).float().mean().item(), predicted


def lr_factor(schedule, warmup_steps, total_steps):
    """The learning rate at each step, as a share of --lr: linear warmup from 0, then the schedule."""
    def factor(step):
        if step < warmup_steps:
            return step / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return {"constant": 1.0, "linear": max(0.0, 1 - progress),
                "cosine": 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))}[schedule]
    return factor


def train(args):
    rank, world = set_up(args)  # seeds torch; device and autocast dtype on args; torchrun: rank of world

    # data: labelled texts, split off a validation set, tokenized once (not padded)
    (train_texts, train_labels), (val_texts, val_labels), label_names = load_splits(
        args.data, args.val_size, args.seed, args.limit)
    label_names = name_classes(args, label_names, train_labels + val_labels)
    tokenizer = tokenizer_for(args)
    train_tokens, val_tokens = (tokenize(tokenizer, texts, args.max_length) for texts in (train_texts, val_texts))
    del train_texts, val_texts
    train_labels, val_labels = torch.tensor(train_labels), torch.tensor(val_labels)
    if rank == 0:
        print(f"{len(train_tokens):,} training rows, {len(val_tokens):,} validation rows")

    # model: the pretrained encoder, a new head, and LoRA on the target layers; all else frozen
    model = load_base_model(args.model, len(label_names))
    inject_lora(model, args.r, args.alpha, args.dropout, args.targets)
    check_budget(model, args, rank)  # prints where the parameters are; refuses more than --max-trainable
    model = cast_frozen_linears(model.to(args.device), args.amp_dtype)
    model.train()  # dropout on, in the encoder and on the adapters' input
    step_model = wrap_for_speed_and_torchrun(model, args, world)  # what train_step calls: DDP, --compile

    # optimizer: AdamW on the adapters and the head, the learning-rate schedule on top
    steps_per_epoch, total_steps, eval_every = count_steps(len(train_tokens), args, world)
    optimizer, scheduler, scaler = make_optimizer(model, args, total_steps)
    config = adapter_config(args, label_names)  # saved beside the adapter: how to rebuild the model

    # the loop: a step per batch; every eval_every steps, score, keep the best or count down patience
    run = Run(args, rank, world, total_steps, steps_per_epoch, model, optimizer, scheduler, scaler)
    if args.resume:
        run.load_latest()  # the adapter, optimizer, schedule, step, patience and RNG of the saved run
    with run:
        for epoch in range(run.step // steps_per_epoch, args.epochs):
            epoch_batches = length_grouped_batches(train_tokens.lengths, args.batch_size, seed=args.seed + epoch)
            for rows, loss_share in run.not_yet_trained(epoch_batches, epoch):
                if run.done:  # early-stopped, Ctrl-C, or the last step was taken
                    break
                input_ids, attention_mask = pad_batch(train_tokens, rows, tokenizer.pad_token_id)
                batch = on_device(input_ids, attention_mask, train_labels[rows], args)
                loss = train_step(step_model, batch, optimizer, scheduler, scaler, args, loss_share)
                run.after_step(loss, rows, train_tokens, batch)  # step + 1; loss and speed, logged now and then
                if run.step % eval_every == 0 or run.step == total_steps:
                    if rank == 0:  # (under torchrun the main process evaluates, and the others follow it)
                        val_loss, val_acc, _ = evaluate(model, val_tokens, val_labels, tokenizer.pad_token_id, args)
                        if val_acc > run.best_acc:  # the best so far: save it
                            run.keep_best(val_acc, {**config, "best_val_accuracy": val_acc, "step": run.step})
                        else:  # no better: one evaluation less of patience
                            run.count_down_patience()
                        run.after_evaluation(val_loss, val_acc)  # log it, save the state --resume needs
                    run.agree_on_stopping()
    if run.interrupted:
        run.save_and_exit()
    if rank != 0:
        return model, run.best_acc

    # restore the best adapter and score it once more, per class
    model.load_state_dict(run.best_state, strict=False)  # strict=False: the adapters and head only
    val_loss, val_acc, predicted = evaluate(model, val_tokens, val_labels, tokenizer.pad_token_id, args)
    report(args, run, val_loss, val_acc, predicted, val_labels, config["labels"])
    return model, val_acc


def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    except (DataError, TargetError) as e:
        fail(str(e))
    except Diverged as e:
        fail(str(e), code=1)


# --- operations: not needed to follow the method --------------------------------------------------
# The command line; checks made before any training; torchrun; the Run that holds the loop's state
# (progress, best adapter, resume, Ctrl-C, metrics); the final report.

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="roberta-base", help="hub name or local folder of the base model")
    p.add_argument("--data", default="ag_news", help="hub dataset name, or .csv/.jsonl/.parquet/.pkl file "
                                                     "or save_to_disk folder with text,label columns")
    p.add_argument("--out", default="checkpoint", help="folder for the best adapter and its config")
    p.add_argument("--num-labels", type=int, default=None, help="default: from the data")
    p.add_argument("--label-names", nargs="+", default=None, help="class names, in label order (default: from "
                                                                  "the data, else 0..K-1)")
    # LoRA
    p.add_argument("--r", type=int, default=2, help="rank of the update B @ A")
    p.add_argument("--alpha", type=float, default=4.0, help="the update is scaled by alpha / r")
    p.add_argument("--dropout", type=float, default=0.05, help="dropout on the adapter's input")
    p.add_argument("--targets", nargs="+", default=["query", "value"], help="Linear layers to adapt")
    p.add_argument("--max-trainable", type=int, default=None, help="refuse a configuration with more "
                                                                   "trainable parameters (the course: 1000000)")
    # optimisation
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of AdamW (see the README's sweeps)")
    p.add_argument("--schedule", choices=["constant", "linear", "cosine"], default="constant",
                   help="after warmup: keep --lr, or decay it linearly or along a cosine to 0 at the last step")
    p.add_argument("--warmup-ratio", type=float, default=0.0, help="share of the steps over which the rate "
                                                                   "rises linearly from 0 to --lr")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm; 0 = no clipping")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (the schedule "
                                                               "ends there too)")
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
    return check_args(p.parse_args(argv))


def check_args(args):
    """Flags out of range end here, with one line (argparse checks only their types)."""
    for flag, value, low in [("--r", args.r, 1), ("--epochs", args.epochs, 1), ("--batch-size", args.batch_size, 1),
                             ("--eval-batch-size", args.eval_batch_size, 1), ("--max-length", args.max_length, 2),
                             ("--patience", args.patience, 1), ("--log-every", args.log_every, 1),
                             ("--eval-every", args.eval_every, 0), ("--max-steps", args.max_steps or 1, 1),
                             ("--max-trainable", 1 if args.max_trainable is None else args.max_trainable, 1)]:
        if value < low:
            fail(f"{flag} must be at least {low}, got {value}")
    if not args.lr > 0:
        fail(f"--lr must be positive, got {args.lr}")
    if not 0 <= args.dropout < 1:
        fail(f"--dropout must be in [0, 1), got {args.dropout}")
    if not 0 <= args.warmup_ratio < 1:
        fail(f"--warmup-ratio must be in [0, 1), got {args.warmup_ratio}")
    return args


def name_classes(args, names_from_data, labels):
    """The class names, one per label 0..K-1: --label-names, else the data's own, else "0".."K-1"."""
    names = args.label_names or names_from_data
    num_labels = args.num_labels or (len(names) if names else count_classes(labels, args.data))
    if names and len(names) != num_labels:
        raise DataError(f"{len(names)} class names ({', '.join(names)}) for {num_labels} labels; give one "
                        "--label-names name per class")
    check_labels(labels, num_labels, args.data)
    return list(names or map(str, range(num_labels)))


def set_up(args):
    """(rank, world): torchrun's, or (0, 1); the device and autocast dtype go on args; torch is seeded."""
    rank, world = start_torchrun(args)
    args.device = device_of(rank, world)  # carried on args, with the autocast dtype, to every helper
    args.amp_dtype = pick_precision(args.device, args.precision)
    torch.manual_seed(args.seed)  # the same on every process: the same initial adapter and head
    return rank, world


def tokenizer_for(args):
    """The base model's tokenizer, after checking that --max-length is within the model's limit."""
    tokenizer = load_tokenizer(args.model)
    limit = model_max_length(tokenizer)
    if args.max_length > limit:
        raise DataError(f"--max-length {args.max_length} is above {args.model}'s limit of {limit} tokens; "
                        f"use --max-length {limit} or less")
    return tokenizer


def check_budget(model, args, rank):
    """Print where the parameters are; --max-trainable: refuse, before any training, a larger configuration."""
    if rank == 0:
        print(parameter_table(model))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if args.max_trainable is not None and trainable > args.max_trainable:
        fits = largest_rank(model, args.r, args.max_trainable)
        raise DataError(f"r={args.r} on {', '.join(args.targets)} trains {trainable:,} parameters, above "
                        f"--max-trainable {args.max_trainable:,}; " + (f"the largest r that fits is {fits}" if fits else
                        "no r fits: the head alone is too large"))


def make_optimizer(model, args, total_steps):
    """AdamW on the trainable tensors (weight decay on matrices only), its schedule, and the fp16 scaler."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": args.weight_decay},
                                   {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.999), fused=args.device.type == "cuda")
    warmup_steps = round(args.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(args.schedule, warmup_steps, total_steps))
    scaler = torch.amp.GradScaler(args.device.type, enabled=args.amp_dtype == torch.float16)
    return optimizer, scheduler, scaler


def adapter_config(args, label_names):
    return {"base_model": args.model, "r": args.r, "alpha": args.alpha, "dropout": args.dropout,
            "targets": list(args.targets), "max_length": args.max_length, "labels": label_names}


def count_steps(rows, args, world):
    """(steps per epoch, total steps, steps between evaluations): --epochs passes over the rows, or
    --max-steps if fewer; an evaluation every --eval-every steps, or at each epoch's end."""
    steps_per_epoch = math.ceil(rows / args.batch_size)
    if world > 1 and 0 < rows % args.batch_size < world:
        steps_per_epoch -= 1  # a last batch smaller than the process count is dropped
    total = steps_per_epoch * args.epochs
    return steps_per_epoch, min(total, args.max_steps or total), args.eval_every or steps_per_epoch


def on_device(input_ids, attention_mask, labels, args):
    """The batch on the training device (pinned memory first on CUDA, so the copy overlaps the GPU's work)."""
    if args.device.type == "cuda":
        input_ids, attention_mask, labels = (t.pin_memory() for t in (input_ids, attention_mask, labels))
    return tuple(t.to(args.device, non_blocking=True) for t in (input_ids, attention_mask, labels))


# --- torchrun: one process per device; a plain `python train.py` has rank 0 of world 1 -----------------

def start_torchrun(args):
    """(rank, world) from torchrun's environment; joins the process group when world > 1."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        if args.batch_size < world:
            raise DataError(f"--batch-size {args.batch_size} is the global batch; it must be at least the "
                            f"{world} processes")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return rank, world


def device_of(rank, world):
    return torch.device("cuda", torch.cuda.current_device()) if world > 1 and torch.cuda.is_available() \
        else pick_device()


def wrap_for_speed_and_torchrun(model, args, world):
    """The module the loop calls: DDP averages gradients across processes; torch.compile fuses kernels."""
    if world > 1:
        model = DistributedDataParallel(model, device_ids=[args.device.index] if args.device.type == "cuda" else None)
    if args.compile:  # dynamic: every batch has its own length
        model = torch.compile(model, dynamic=True)
    return model


# --- the loop's state: progress, best adapter, resume, Ctrl-C, metrics -----------------------------------

LAST_ADAPTER, LAST_STATE = "last_adapter.safetensors", "last_state.pt"  # for --resume
METRICS_FILE = "metrics.jsonl"
RESUMABLE_CHANGES = {"resume", "epochs", "max_steps", "patience", "log_every", "compile", "export_peft"}


class Diverged(RuntimeError):
    """The loss stopped being a finite number."""


class Run:
    """What the loop keeps between steps: the step, the best accuracy and adapter, patience, the log.

    `with run:` catches Ctrl-C between steps (a second one stops at once) and closes the log.
    """

    def __init__(self, args, rank, world, total_steps, steps_per_epoch, model, optimizer, scheduler, scaler):
        self.args, self.rank, self.world, self.total_steps = args, rank, world, total_steps
        self.steps_per_epoch, self.model = steps_per_epoch, model
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.step, self.best_acc, self.bad_evals, self.stopped, self.best_state = 0, -1.0, 0, False, None
        self.running_loss = torch.zeros((), device=args.device)
        self.steps_since_log = self.seen_rows = self.seen_tokens = self.computed_tokens = 0
        self.pressed = threading.Event()
        if rank == 0:
            print(f"{total_steps:,} steps on {args.device} ({args.amp_dtype or 'fp32'})"
                  + (f" x {world} processes" if world > 1 else ""))

    def __enter__(self):
        self.previous_handler = signal.getsignal(signal.SIGINT)
        if self.world == 1:  # under torchrun, Ctrl-C is torchrun's: every process stops at once
            def handler(signum, frame):
                self.pressed.set()
                signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGINT, handler)
        if self.rank == 0:
            os.makedirs(self.args.out, exist_ok=True)
            self.metrics = open(os.path.join(self.args.out, METRICS_FILE), "a" if self.args.resume else "w")
        self.bar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True,
                        disable=self.rank != 0)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.elapsed = time.perf_counter() - self.start
        signal.signal(signal.SIGINT, self.previous_handler)
        self.bar.close()
        if self.rank == 0:
            self.metrics.close()
        if self.world > 1 and exc[0] is None:
            dist.destroy_process_group()

    @property
    def interrupted(self):
        return self.pressed.is_set()

    @property
    def done(self):
        return self.stopped or self.interrupted or self.step >= self.total_steps

    def not_yet_trained(self, global_batches, epoch):
        """(this process's rows, its share of the batch) of each batch not yet trained on (--resume skips)."""
        global_batches = [b for b in global_batches if len(b) >= self.world]  # every process needs a row
        for rows in global_batches[max(0, self.step - epoch * self.steps_per_epoch):]:
            mine = rows[self.rank::self.world]  # row i of the batch goes to process i mod world
            # DDP averages over processes: weigh each mean loss by its share, for the whole batch's gradient
            yield mine, len(mine) * self.world / len(rows)

    def after_step(self, loss, rows, tokens, batch):
        """Count the step; keep the loss on the device and read it only every --log-every steps."""
        self.step += 1
        self.bar.update()
        self.running_loss += loss
        self.steps_since_log += 1
        self.seen_rows += len(rows)
        self.seen_tokens += int(tokens.lengths[rows].sum())
        self.computed_tokens += batch[0].numel()
        if self.step % self.args.log_every == 0:
            train_loss = self.running_loss.item() / self.steps_since_log
            self.check_finite(train_loss, "training loss")
            self.bar.set_postfix(loss=f"{train_loss:.4f}")
            self.log(train_loss=train_loss, lr=self.optimizer.param_groups[0]["lr"])
            self.running_loss.zero_()
            self.steps_since_log = 0

    def keep_best(self, val_acc, config):
        """A better validation accuracy: keep this adapter, in memory and on disk, with its config."""
        self.best_acc, self.bad_evals, self.improved = val_acc, 0, True
        self.best_state = {n: t.detach().clone() for n, t in lora_state_dict(self.model).items()}
        save_tensors(os.path.join(self.args.out, ADAPTER_FILE), self.best_state)
        write_atomically(os.path.join(self.args.out, CONFIG_FILE), lambda f: json.dump(config, f, indent=2))

    def count_down_patience(self):
        self.bad_evals, self.improved = self.bad_evals + 1, False
        self.stopped = self.bad_evals >= self.args.patience

    def after_evaluation(self, val_loss, val_acc):
        """Say how it went, stop on a non-finite loss, log it, and save the state --resume needs."""
        self.check_finite(val_loss, "validation loss")
        self.log(val_loss=val_loss, val_accuracy=val_acc)
        tqdm.write(f"step {self.step}: val loss {val_loss:.4f}, val accuracy {val_acc:.4f}"
                   + (" (best so far, saved)" if self.improved else ""))
        if self.stopped:
            tqdm.write(f"early stop: no better validation accuracy in {self.args.patience} evaluations")
        self.save_latest()

    def agree_on_stopping(self):
        if self.world > 1:
            holder = [(self.best_acc, self.bad_evals, self.stopped)]
            dist.broadcast_object_list(holder, src=0)
            self.best_acc, self.bad_evals, self.stopped = holder[0]

    def check_finite(self, value, what):
        if not math.isfinite(value):
            raise Diverged(f"the {what} became {value} by step {self.step}; lower --lr (now {self.args.lr:g}) or "
                           f"use --precision fp32. The best adapter so far is kept in {self.args.out}")

    def log(self, **row):
        """One JSON line of metrics.jsonl (a log or an evaluation step)."""
        if self.rank == 0:
            self.metrics.write(json.dumps({"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 3),
                                           **row, "elapsed_s": round(time.perf_counter() - self.start, 2)}) + "\n")
            self.metrics.flush()

    def save_latest(self):
        """Everything --resume needs: latest tensors, optimizer, schedule and scaler state, progress, RNG."""
        args = self.args
        save_tensors(os.path.join(args.out, LAST_ADAPTER), lora_state_dict(self.model), {"step": str(self.step)})
        state = {"step": self.step, "best_acc": self.best_acc, "bad_evals": self.bad_evals, "stopped": self.stopped,
                 "args": {k: v for k, v in vars(args).items() if k not in ("device", "amp_dtype")},
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict(), "rng_cpu": torch.get_rng_state(),
                 "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        write_atomically(os.path.join(args.out, LAST_STATE), lambda f: torch.save(state, f), mode="wb")

    def load_latest(self):
        """Load what save_latest wrote, after checking it is whole and the flags are the same."""
        args = self.args
        state, tensors = read_latest(args.out)
        changed = [f"--{k.replace('_', '-')} was {v!r}, now {getattr(args, k, None)!r}"
                   for k, v in state["args"].items() if k not in RESUMABLE_CHANGES and getattr(args, k, None) != v]
        if changed:
            raise DataError(f"--resume needs the flags of the run it continues: {'; '.join(changed)}")
        self.model.load_state_dict(tensors, strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.step, self.best_acc, self.bad_evals = state["step"], state["best_acc"], state["bad_evals"]
        self.stopped = self.bad_evals >= args.patience  # --patience may have been raised to go on
        if self.best_acc >= 0:
            self.best_state = load_file(os.path.join(args.out, ADAPTER_FILE), device=str(args.device))
        if self.rank == 0:
            print(f"resumed from {args.out} at step {self.step} (best val accuracy so far {max(self.best_acc, 0):.4f})")

    def save_and_exit(self):
        """After Ctrl-C: save the latest state and print the command that continues the run."""
        self.save_latest()
        argv = sys.argv[1:] + ([] if "--resume" in sys.argv else ["--resume"])
        print(f"interrupted at step {self.step}; the latest state is saved in {self.args.out}. Resume with:\n"
              f"  python train.py {shlex.join(argv)}")
        sys.exit(130)


def read_latest(out):
    """(state, tensors) saved for --resume in `out`, checked to be readable and of the same step."""
    adapter_path, state_path = os.path.join(out, LAST_ADAPTER), os.path.join(out, LAST_STATE)
    if not (os.path.isfile(adapter_path) and os.path.isfile(state_path)):
        raise DataError(f"{out}: no saved training state to resume; run without --resume to start afresh")
    try:
        state = torch.load(state_path, weights_only=True)  # plain data and tensors, never code
        with safe_open(adapter_path, "pt") as f:
            saved_step = int(f.metadata()["step"])
        tensors = load_file(adapter_path)
    except Exception as e:
        raise DataError(f"{out}: the saved training state is unreadable ({type(e).__name__}); "
                        "run without --resume to start afresh") from None
    if saved_step != state["step"]:
        raise DataError(f"{out}: the saved tensors (step {saved_step}) and state (step {state['step']}) "
                        "do not match; run without --resume to start afresh")
    return state, tensors


# --- the final report ----------------------------------------------------------------------------------

def report(args, run, val_loss, val_acc, predicted, labels, names):
    """The restored adapter's accuracy with its interval, per class, the files written, and the speed."""
    low, high = bootstrap_interval(predicted == labels, args.seed)
    print(f"restored the best adapter: val loss {val_loss:.4f}, val accuracy {val_acc:.4f} "
          f"(95% bootstrap interval {low:.4f}-{high:.4f}, {len(labels)} rows) -> {args.out}")
    confusion = confusion_matrix(predicted, labels, len(names))
    print(class_report(confusion, names))
    if args.export_peft:
        export_peft(args.out, args.export_peft)
        print(f"PEFT adapter: {args.export_peft}")
    pictures = [p for p in (plot_curves(args.out), plot_confusion(confusion, names,
                                                                  os.path.join(args.out, "confusion.png"))) if p]
    print(f"metrics: {os.path.join(args.out, METRICS_FILE)}" + (f", pictures: {', '.join(pictures)}" if pictures else
                                                                 " (pip install matplotlib for curves.png)"))
    if run.seen_rows:
        print(f"{run.elapsed:.1f} s training, {run.world * run.seen_rows / run.elapsed:.1f} samples/s, "
              f"{run.world * run.seen_tokens / run.elapsed:,.0f} tokens/s, "
              f"{1 - run.seen_tokens / run.computed_tokens:.1%} of positions were padding, peak "
              f"{peak_memory(args.device)}")


def bootstrap_interval(correct, seed, rounds=2000):
    """95% confidence interval of an accuracy: resample the rows with replacement, take percentiles."""
    rows = torch.randint(len(correct), (rounds, len(correct)), generator=torch.Generator().manual_seed(seed))
    accuracies = correct.float()[rows].mean(dim=1)
    return torch.quantile(accuracies, 0.025).item(), torch.quantile(accuracies, 0.975).item()


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
        if points:
            ax.plot(*zip(*points), marker="." if key == "val_accuracy" else None)
        ax.set(title=title, xlabel="step")
    fig.tight_layout()
    path = os.path.join(out, "curves.png")
    write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=100), mode="wb")
    plt.close(fig)
    return path


def peak_memory(device):
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB GPU"
    try:
        import resource  # Unix only
    except ImportError:
        return "(not measured)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"


if __name__ == "__main__":
    main()
