"""How we learn: LoRA fine-tuning of a sequence classifier with a plain PyTorch loop.

    python train.py --r 2 --alpha 4 --lr 5e-6          # the reference run: roberta-base on ag_news
                                                        # (a small rate: the default is 1e-3, see the README)
    python train.py --model DIR --data train.csv ...    # a local model folder and data file

The method, as `train()` reads: tokenize the texts once; load the pretrained encoder with a new
classification head and put LoRA adapters on its `query` and `value` layers, freezing everything
else but the head; then, batch after batch, one AdamW step on the cross-entropy, the learning rate
following its schedule. Every --eval-every steps the validation split is scored: a better accuracy
keeps the adapter and saves it, --patience evaluations without one end the run. At the end the best
adapter is put back, and its evaluation is reported per class.

Several GPUs or machines: the same script under torchrun (DistributedDataParallel, one process each):
    torchrun --nproc_per_node=4 train.py ...
"""
import argparse
import contextlib
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
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from checkpoint import (checkpoint_tensors, export_peft, head_of, load_base_model, load_tokenizer,
                        made_for_the_task, model_max_length, save_checkpoint)
from data import DataError, length_grouped_batches, load_splits, pad_batch, tokenize, write_atomically
from lora import TargetError, count_per_rank, inject_lora, largest_rank, parameter_table, target_paths
from predict import cast_frozen_linears, fail, pick_device, pick_precision, predict_logits, report_classes


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


def count_steps(rows, args):
    """(steps per epoch, total steps, steps between evaluations): --epochs passes over the rows, or
    --max-steps if fewer; an evaluation every --eval-every steps, or at each epoch's end."""
    steps_per_epoch = math.ceil(rows / args.batch_size)
    total = steps_per_epoch * args.epochs
    return steps_per_epoch, min(total, args.max_steps or total), args.eval_every or steps_per_epoch


def tokenized_splits(args, rank):
    """(tokenizer, class names, (train tokens, labels), (validation tokens, labels)): the labelled texts of
    --data, split off a validation set with --seed, each text tokenized once and not padded."""
    (train_texts, train_labels), (val_texts, val_labels), label_names = load_splits(
        args.data, args.val_size, args.seed, args.limit, args.label_names, args.num_labels)
    tokenizer = tokenizer_for(args)
    if rank == 0:
        print(f"{len(train_texts):,} training rows, {len(val_texts):,} validation rows")
    return tokenizer, label_names, *((tokenize(tokenizer, texts, args.max_length), torch.tensor(labels))
                                     for texts, labels in ((train_texts, train_labels), (val_texts, val_labels)))


def rank_and_alpha(model, skip, args):
    """(r, alpha): --r, or with --r auto the largest rank whose adapters and head fit --max-trainable;
    --alpha, or 2r (the reference run's alpha / r of 2)."""
    r = args.r
    if r == "auto":
        per_rank = count_per_rank(model, target_paths(model, args.targets, skip))
        head = sum(p.numel() for p in head_of(model).parameters())
        r = largest_rank(per_rank, head, args.max_trainable)
        if r < 1:
            raise DataError(f"--r auto: no rank fits --max-trainable {args.max_trainable:,}: the head alone has "
                            f"{head:,} and each rank on {', '.join(args.targets)} adds {per_rank:,}")
    return r, 2.0 * r if args.alpha is None else args.alpha


def keep_best(args, model, new, config, evaluation):
    """The best so far: the trained tensors as they are now (in memory, to restore at the end), their
    evaluation (validation loss and predicted classes, for the final report), and the checkpoint on disk."""
    val_loss, val_acc, predicted = evaluation
    save_checkpoint(args.out, checkpoint_tensors(model, new), {**config, "best_val_accuracy": val_acc})
    return {"tensors": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
            "val_loss": val_loss, "predicted": predicted}


def restore(model, best, step):
    """Put the best adapter and head back into the model (strict=False: those are all `best` holds)."""
    if best is None:  # resumed with no step left to take, before any evaluation
        raise DataError(f"no evaluation has run yet (step {step}); resume with a larger --max-steps or --epochs")
    model.load_state_dict(best["tensors"], strict=False)


def train(args):
    rank, world, args.device = start_torchrun(args)  # torchrun: this process's rank of `world`; else 0 of 1
    args.amp_dtype = pick_precision(args.device, args.precision)  # what autocast computes in: bf16, fp16, None
    torch.manual_seed(args.seed + rank)  # its own dropout masks (DDP gives every process rank 0's weights)

    # data: labelled texts, split off a validation set, tokenized once (not padded)
    tokenizer, label_names, (train_tokens, train_labels), (val_tokens, val_labels) = tokenized_splits(args, rank)

    # model: the pretrained encoder, a new head, LoRA on the target layers; everything else frozen
    model, new = load_base_model(args.model, len(label_names))  # new: the names of the tensors made for the task
    skip = made_for_the_task(model, new)  # the head and whatever else is new: trained whole, never adapted
    r, alpha = rank_and_alpha(model, skip, args)  # --r auto: the largest rank under --max-trainable
    adapted = inject_lora(model, r, alpha, args.dropout, args.targets, skip, args.init)
    head_of(model).requires_grad_(True)  # the head trains in full (to freeze it as well, delete this line)
    check_budget(model, new, args, r, alpha, rank)  # prints where the parameters are; refuses over --max-trainable
    model = cast_frozen_linears(model.to(args.device), args.amp_dtype).train()  # dropout on
    step_model = wrap_for_speed_and_torchrun(model, args, world)  # what steps call: DDP's wrapper, --compile's

    # optimizer: AdamW on the adapters and the head, the learning-rate schedule on top
    steps_per_epoch, total_steps, eval_every = count_steps(len(train_tokens), args)
    optimizer, scheduler, scaler = make_optimizer(model, args, total_steps)
    config = adapter_config(args, label_names, adapted, r, alpha)  # saved beside the adapter: how to rebuild
    parts = (model, optimizer, scheduler, scaler)  # what a saved run holds, with the loop's state below

    # the loop: a step per batch; every eval_every steps, score, keep the best or count down patience
    step, best_acc, best, bad_evals = resume_run(args, parts, rank, world) if args.resume else (0, -1.0, None, 0)
    stop = bad_evals >= args.patience  # best: best adapter and head, with their evaluation; bad_evals: patience used
    with Progress(args, rank, world, (steps_per_epoch, total_steps), step) as progress, ctrl_c_stops(world) as pressed:
        for epoch in range(step // steps_per_epoch, args.epochs):
            batches = length_grouped_batches(train_tokens.lengths, args.batch_size, seed=args.seed + epoch)
            for rows in batches[step - epoch * steps_per_epoch:]:  # after --resume, only those not yet trained on
                if stop or pressed.is_set() or step >= total_steps:
                    break
                rows, loss_share = share_of_batch(rows, rank, world)  # torchrun: this process's rows
                batch = on_device(*pad_batch(train_tokens, rows, tokenizer.pad_token_id), train_labels[rows], args)
                loss = train_step(step_model, batch, optimizer, scheduler, scaler, args, loss_share)
                step += 1
                progress.after_step(step, loss, train_tokens.lengths[rows], batch[0].numel(), optimizer)
                if step % eval_every == 0 or step == total_steps:
                    if rank == 0:  # torchrun: the main process evaluates, and the others follow its verdict
                        val_loss, val_acc, predicted = evaluate(model, val_tokens, val_labels,
                                                                tokenizer.pad_token_id, args)
                        if val_acc > best_acc:  # the best so far: keep it, in memory and on disk
                            best_acc, bad_evals = val_acc, 0
                            best = keep_best(args, model, new, {**config, "step": step}, (val_loss, val_acc, predicted))
                        else:  # no better: one evaluation less of patience
                            bad_evals += 1
                        progress.after_evaluation(step, val_loss, val_acc, bad_evals)
                    stop = agree_to_stop(bad_evals >= args.patience, world)  # torchrun: every process stops
                    save_run(args, parts, (step, best_acc, best, bad_evals), rank, world)
    if pressed.is_set():
        exit_interrupted(args, parts, (step, best_acc, best, bad_evals), rank, world)
    finish_torchrun(world)
    if rank != 0:  # torchrun: the main process alone restores and reports
        return model, best_acc

    # restore the best adapter; report its evaluation, per class
    restore(model, best, step)
    report(args, progress, best, best_acc, val_labels, label_names)
    return model, best_acc


def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    except (DataError, TargetError) as e:
        fail(str(e))
    except Diverged as e:
        fail(str(e), code=1)


# --- operations: not needed to follow the method --------------------------------------------------
# The command line; checks made before any training; torchrun; what a run shows; saving and
# resuming a run; the final report.

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
    p.add_argument("--r", type=rank_flag, default=2, help="rank of the update B @ A; auto: the largest that "
                                                           "fits --max-trainable")
    p.add_argument("--alpha", type=float, default=None, help="the update is scaled by alpha / r (default: 2r)")
    p.add_argument("--dropout", type=float, default=0.05, help="dropout on the adapter's input")
    p.add_argument("--targets", nargs="+", default=["query", "value"], help="Linear layers to adapt: dotted "
                   "suffixes of their paths (query, attention.output.dense, ...) or all-linear")
    p.add_argument("--init", choices=["lora", "pissa"], default="lora", help="lora: A random, B zero; pissa: "
                   "A and B from W0's top-r SVD, the base the residual (lora.py)")
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


def rank_flag(value):
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--r takes a whole number or auto, not {value!r}") from None


def check_args(args):
    """Flags out of range end here, with one line (argparse checks only their types)."""
    for flag, value, low in [("--r", 1 if args.r == "auto" else args.r, 1), ("--epochs", args.epochs, 1),
                             ("--batch-size", args.batch_size, 1), ("--eval-batch-size", args.eval_batch_size, 1),
                             ("--max-length", args.max_length, 2), ("--patience", args.patience, 1),
                             ("--log-every", args.log_every, 1), ("--eval-every", args.eval_every, 0),
                             ("--max-steps", 1 if args.max_steps is None else args.max_steps, 1),
                             ("--max-trainable", 1 if args.max_trainable is None else args.max_trainable, 1)]:
        if value < low:
            fail(f"{flag} must be at least {low}, got {value}")
    if args.r == "auto" and args.max_trainable is None:
        fail("--r auto needs --max-trainable N (the budget the rank is fitted to), e.g. --max-trainable 1000000")
    if not args.lr > 0:
        fail(f"--lr must be positive, got {args.lr}")
    if not 0 <= args.dropout < 1:
        fail(f"--dropout must be in [0, 1), got {args.dropout}")
    if not 0 <= args.warmup_ratio < 1:
        fail(f"--warmup-ratio must be in [0, 1), got {args.warmup_ratio}")
    return args


def tokenizer_for(args):
    """The base model's tokenizer, after checking that --max-length is within the model's limit."""
    tokenizer = load_tokenizer(args.model)
    limit = model_max_length(tokenizer)
    if args.max_length > limit:
        raise DataError(f"--max-length {args.max_length} is above {args.model}'s limit of {limit} tokens; "
                        f"use --max-length {limit} or less")
    return tokenizer


def check_budget(model, new, args, r, alpha, rank):
    """Print where the parameters are; --max-trainable: refuse, before any training, a larger configuration."""
    if rank == 0:
        chosen = f" (--r auto: the largest under {args.max_trainable:,})" if args.r == "auto" else ""
        saved = " (PiSSA: the saved adapter is plain LoRA of rank 2r, twice the LoRA count)" \
            if args.init == "pissa" else ""
        print(f"LoRA r={r}{chosen}, alpha={alpha:g}, init {args.init}{saved}\n{parameter_table(model, new)}")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if args.max_trainable is not None and trainable > args.max_trainable:
        lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
        fits = largest_rank(lora // r, trainable - lora, args.max_trainable)
        raise DataError(f"r={r} on {', '.join(args.targets)} trains {trainable:,} parameters, above "
                        f"--max-trainable {args.max_trainable:,}; " + (f"the largest r that fits is {fits}" if fits else
                        "no r fits: the head alone is too large"))


def adapter_config(args, label_names, adapted, r, alpha):
    """How to rebuild the model: the base, the adapted paths, and the saved adapter's rank and alpha
    (PiSSA saves plain LoRA of rank 2r with alpha 2 alpha: the same scale, see lora.py)."""
    saved = 2 if args.init == "pissa" else 1
    return {"base_model": args.model, "r": saved * r, "alpha": saved * alpha, "trained_r": r, "init": args.init,
            "dropout": args.dropout, "targets": adapted, "max_length": args.max_length, "labels": label_names}


def on_device(input_ids, attention_mask, labels, args):
    """The batch on the training device (pinned memory first on CUDA, so the copy overlaps the GPU's work)."""
    if args.device.type == "cuda":
        input_ids, attention_mask, labels = (t.pin_memory() for t in (input_ids, attention_mask, labels))
    return tuple(t.to(args.device, non_blocking=True) for t in (input_ids, attention_mask, labels))


# --- torchrun: one process per device; a plain `python train.py` is rank 0 of 1 and does none of it ----

def start_torchrun(args):
    """(rank, world, device) from torchrun's environment, joining its process group; (0, 1, the best
    device there is) for a plain `python train.py`."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        if args.batch_size < world:
            raise DataError(f"--batch-size {args.batch_size} is the global batch; it must be at least the "
                            f"{world} processes")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    device = torch.device("cuda", torch.cuda.current_device()) if world > 1 and torch.cuda.is_available() \
        else pick_device()
    return rank, world, device


def wrap_for_speed_and_torchrun(model, args, world):
    """The module the loop calls: DDP averages gradients across processes; torch.compile fuses kernels."""
    if world > 1:
        model = DistributedDataParallel(model, device_ids=[args.device.index] if args.device.type == "cuda" else None)
    if args.compile:  # dynamic: every batch has its own length
        model = torch.compile(model, dynamic=True)
    return model


def share_of_batch(rows, rank, world):
    """This process's rows of a global batch (row i goes to process i mod world), and the share of the
    batch's loss they carry: DDP averages the processes' gradients, which is then the whole batch's."""
    mine = rows[rank::world]
    if not mine:  # a last batch smaller than the process count: one row, weighted 0
        return rows[:1], 0.0
    return mine, len(mine) * world / len(rows)


def agree_to_stop(stop, world):
    """The main process's verdict (it alone evaluates), sent to every process."""
    if world > 1:
        verdict = [stop]
        dist.broadcast_object_list(verdict, src=0)
        stop = verdict[0]
    return stop


def rng_states(world):
    """Every process's RNG state (its dropout stream), gathered: each resumes its own."""
    mine = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    if world == 1:
        return [mine]
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    return gathered


def finish_torchrun(world):
    """Leave the process group together: a process that leaves while another still sends can abort."""
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


# --- what a run shows: the progress bar, metrics.jsonl, speed; Ctrl-C; a loss that stops being a number ---

METRICS_FILE = "metrics.jsonl"


class Diverged(RuntimeError):
    """The loss stopped being a finite number."""


class Progress:
    """The progress bar and metrics.jsonl (main process only), and what was computed, for the speed report.

    The loss stays on the device, summed, and is read (a sync) only every --log-every steps.
    """

    def __init__(self, args, rank, world, steps, step):
        self.args, self.rank, self.world, (self.steps_per_epoch, self.total_steps) = args, rank, world, steps
        self.first_step, self.loss_sum, self.steps_since_log = step, torch.zeros((), device=args.device), 0
        self.rows = self.tokens = self.computed = 0  # this process's, since the start (or the resume)
        if rank == 0:
            print(f"{self.total_steps:,} steps on {args.device} ({args.amp_dtype or 'fp32'})"
                  + (f" x {world} processes" if world > 1 else ""))

    def __enter__(self):
        self.metrics = None
        if self.rank == 0:
            os.makedirs(self.args.out, exist_ok=True)
            self.metrics = open(os.path.join(self.args.out, METRICS_FILE), "a" if self.args.resume else "w")
        self.bar = tqdm(total=self.total_steps, initial=self.first_step, desc="train", dynamic_ncols=True,
                        disable=self.rank != 0)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.elapsed = time.perf_counter() - self.start
        self.bar.close()
        if self.metrics:
            self.metrics.close()

    def after_step(self, step, loss, lengths, computed, optimizer):
        self.bar.update()
        self.loss_sum += loss
        self.steps_since_log += 1
        self.rows, self.tokens, self.computed = self.rows + len(lengths), self.tokens + int(lengths.sum()), \
            self.computed + computed
        if step % self.args.log_every == 0:
            train_loss = self.loss_sum.item() / self.steps_since_log
            self.check_finite(train_loss, "training loss", step)
            self.bar.set_postfix(loss=f"{train_loss:.4f}")
            self.log(step, train_loss=train_loss, lr=optimizer.param_groups[0]["lr"])
            self.loss_sum.zero_()
            self.steps_since_log = 0

    def after_evaluation(self, step, val_loss, val_acc, bad_evals):
        self.check_finite(val_loss, "validation loss", step)
        self.log(step, val_loss=val_loss, val_accuracy=val_acc)
        tqdm.write(f"step {step}: val loss {val_loss:.4f}, val accuracy {val_acc:.4f}"
                   + (" (best so far, saved)" if bad_evals == 0 else ""))
        if bad_evals >= self.args.patience:
            tqdm.write(f"early stop: no better validation accuracy in {self.args.patience} evaluations")

    def check_finite(self, value, what, step):
        if not math.isfinite(value):
            raise Diverged(f"the {what} became {value} by step {step}; lower --lr (now {self.args.lr:g}) or "
                           f"use --precision fp32. The best adapter so far is kept in {self.args.out}")

    def log(self, step, **row):
        """One JSON line of metrics.jsonl (a log or an evaluation step)."""
        if self.metrics:
            self.metrics.write(json.dumps({"step": step, "epoch": round(step / self.steps_per_epoch, 3), **row,
                                           "elapsed_s": round(time.perf_counter() - self.start, 2)}) + "\n")
            self.metrics.flush()


@contextlib.contextmanager
def ctrl_c_stops(world):
    """An Event that Ctrl-C sets: the loop stops between steps and saves the run (a second Ctrl-C stops at
    once). Under torchrun, Ctrl-C is torchrun's: every process ends at once."""
    pressed, previous = threading.Event(), signal.getsignal(signal.SIGINT)
    if world == 1:
        def handler(signum, frame):
            pressed.set()
            signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGINT, handler)
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, previous)


# --- saving and resuming a run: one file, last_state.pt, written at every evaluation and on Ctrl-C ------

LAST_STATE = "last_state.pt"
LAST_STATE_FORMAT = 2  # 2: the best tensors are kept with their evaluation
RESUMABLE_CHANGES = {"resume", "epochs", "max_steps", "patience", "log_every", "compile", "export_peft"}


def save_run(args, parts, loop_state, rank, world):
    """Everything --resume needs: the trained tensors (as they train: rank r), the loop's state (step, best
    accuracy, the best tensors with their evaluation, patience used), the optimizer, schedule and scaler,
    and every process's RNG state. Written by the main process."""
    (model, optimizer, scheduler, scaler), (step, best_acc, best, bad_evals) = parts, loop_state
    rngs = rng_states(world)  # torchrun: every process takes part
    if rank != 0:
        return
    state = {"format": LAST_STATE_FORMAT, "step": step, "best_acc": best_acc, "best": best, "bad_evals": bad_evals,
             "trained": {n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
             "args": {k: v for k, v in vars(args).items() if k not in ("device", "amp_dtype")},
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
             "rng": rngs}
    write_atomically(os.path.join(args.out, LAST_STATE), lambda f: torch.save(state, f), mode="wb")


def resume_run(args, parts, rank, world):
    """Load what save_run wrote, after checking the flags are the same; returns (step, best_acc, best, bad_evals).
    Loaded on the CPU: load_state_dict copies each tensor to where the model and optimizer live."""
    model, optimizer, scheduler, scaler = parts
    path = os.path.join(args.out, LAST_STATE)
    if not os.path.isfile(path):
        raise DataError(f"{args.out}: no saved training state to resume; run without --resume to start afresh")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")  # plain data and tensors, never code
    except Exception as e:
        raise DataError(f"{args.out}: the saved training state is unreadable ({type(e).__name__}); "
                        "run without --resume to start afresh") from None
    if state.get("format") != LAST_STATE_FORMAT:
        raise DataError(f"{args.out}: the saved training state was written by another version of train.py; "
                        "run without --resume to start afresh")
    changed = [f"--{k.replace('_', '-')} was {v!r}, now {getattr(args, k, None)!r}"
               for k, v in state["args"].items() if k not in RESUMABLE_CHANGES and getattr(args, k, None) != v]
    if len(state["rng"]) != world:
        changed.append(f"{len(state['rng'])} processes, now {world}")
    if changed:
        raise DataError(f"--resume needs the flags of the run it continues: {'; '.join(changed)}")
    model.load_state_dict(state["trained"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"][rank]["cpu"])  # this process's own stream
    if state["rng"][rank]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"][rank]["cuda"])
    if rank == 0:
        print(f"resumed from {args.out} at step {state['step']} (best val accuracy so far "
              f"{max(state['best_acc'], 0):.4f})")
    return state["step"], state["best_acc"], state["best"], state["bad_evals"]


def exit_interrupted(args, parts, loop_state, rank, world):
    """After Ctrl-C: save the run, print the command that continues it, exit."""
    save_run(args, parts, loop_state, rank, world)
    step = loop_state[0]
    argv = sys.argv[1:] + ([] if "--resume" in sys.argv else ["--resume"])
    print(f"interrupted at step {step}; the latest state is saved in {args.out}. Resume with:\n"
          f"  python train.py {shlex.join(argv)}")
    sys.exit(130)


# --- the final report ----------------------------------------------------------------------------------

def report(args, progress, best, val_acc, labels, names):
    """The restored adapter's evaluation (kept when it was the best: no second pass over the validation
    split): its accuracy with an interval, per class, the files written, and the speed."""
    val_loss, predicted = best["val_loss"], best["predicted"]
    low, high = bootstrap_interval(predicted == labels, args.seed)
    print(f"restored the best adapter: val loss {val_loss:.4f}, val accuracy {val_acc:.4f} "
          f"(95% bootstrap interval {low:.4f}-{high:.4f}, {len(labels)} rows) -> {args.out}")
    pictures = [report_classes(predicted, labels, names, args.out, print_accuracy=False), plot_curves(args.out)]
    if args.export_peft:
        export_peft(args.out, args.export_peft)
        print(f"PEFT adapter: {args.export_peft}")
    pictures = [p for p in pictures if p]
    print(f"metrics: {os.path.join(args.out, METRICS_FILE)}" + (f", pictures: {', '.join(pictures)}" if pictures else
                                                                 " (pip install matplotlib for curves.png)"))
    if progress.rows:
        world = progress.world  # every process trains on as many rows as this one
        print(f"{progress.elapsed:.1f} s training, {world * progress.rows / progress.elapsed:.1f} samples/s, "
              f"{world * progress.tokens / progress.elapsed:,.0f} tokens/s, "
              f"{1 - progress.tokens / progress.computed:.1%} of positions were padding, peak "
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
