"""How we learn: LoRA fine-tuning of a sequence classifier with a plain PyTorch loop.

    python train.py --r 2 --alpha 4 --lr 5e-6          # the reference run: roberta-base, ag_news
    python train.py --model DIR --data train.csv ...    # a local model folder and data file
    torchrun --nproc_per_node=4 train.py ...            # several GPUs: one process each (DDP)

`train()` is the method: a validation split; the pretrained encoder with a new head and LoRA on
`query` and `value`, all else frozen but the head; then one AdamW step on the cross-entropy per
batch. Every --eval-every steps a better validation accuracy keeps the adapter, and --patience
evaluations without one stop the run; the best adapter is put back. What a run needs besides
(the device, torchrun, the log, saving, Ctrl-C) is `run` (class Run, below the operations line).
"""
import math

import torch
import torch.nn.functional as F

from checkpoint import checkpoint_tensors, load_base_model, save_checkpoint
from data import DataError, length_grouped_batches, load_splits, pad_batch, tokenize
from lora import count_per_rank, inject_lora, largest_rank, target_paths
from predict import cast_frozen_linears, predict_logits


def train_step(model, micro_batches, optimizer, scheduler, scaler, args):
    """One step: per micro-batch, forward under autocast, cross-entropy, backward (the gradients
    add up); then clip, AdamW, the next rate. The loss stays on the device (no wait for the GPU)."""
    total = 0.0
    for input_ids, attention_mask, labels, share in micro_batches:
        with torch.autocast(input_ids.device.type, args.amp_dtype, args.amp_dtype is not None):
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        loss = F.cross_entropy(logits.float(), labels) * share  # its share of the batch's mean
        scaler.scale(loss).backward()  # the scaler scales only in fp16, where gradients underflow
        total = total + loss.detach()
    if args.max_grad_norm > 0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
        trained = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(trained, args.max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def micro_batches(tokens, labels, rows, pad_id, run, args):
    """This process's rows of a batch (torchrun: every world-th) in --grad-accum padded pieces on
    the device, each with its share of the loss (x world: DDP averages), as many on each process."""
    mine = rows[run.rank::run.world]
    pieces = []
    for i in range(args.grad_accum):
        piece = mine[i * len(mine) // args.grad_accum:(i + 1) * len(mine) // args.grad_accum]
        share = len(piece) * run.world / len(rows)
        piece = piece or rows[:1]  # an empty piece: one row counted 0, so that DDP's sums line up
        input_ids, mask = pad_batch(tokens, piece, pad_id, run.pad_to, args.max_length)
        mask = mask[:, None, None, :].bool()  # SDPA's own form: no asking the GPU about padding
        input_ids, mask, piece_labels = run.to_device(input_ids, mask, labels[piece])
        pieces.append((input_ids, mask, piece_labels, share))
    return pieces


def evaluate(model, tokens, labels, pad_id, args):
    """(mean cross-entropy, accuracy, predicted classes) on a labelled split."""
    logits = predict_logits(model, tokens, pad_id, args.eval_batch_size, args.device,
                            args.amp_dtype)
    predicted = logits.argmax(-1)
    accuracy = (predicted == labels).float().mean().item()
    return F.cross_entropy(logits, labels).item(), accuracy, predicted


SCHEDULES = {  # the rate after warmup, as a share of --lr, at `progress` from 0 to 1
    "constant": lambda progress: 1.0,
    "linear": lambda progress: max(0.0, 1 - progress),
    "cosine": lambda progress: 0.5 * (1 + math.cos(math.pi * min(1.0, progress))),
}


def lr_factor(schedule, warmup_steps, total_steps):
    """The rate at a step, a share of --lr: linear warmup from 0, then the chosen SCHEDULES[...]."""
    def factor(step):
        if step < warmup_steps:
            return step / warmup_steps
        return SCHEDULES[schedule]((step - warmup_steps) / max(1, total_steps - warmup_steps))
    return factor


def make_optimizer(model, args, total_steps):
    """AdamW on the trainable tensors (weight decay on matrices only), its schedule, and the
    gradient scaler (on in fp16 only)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, fused=True)  # one kernel, no host sync
    warmup_steps = round(args.warmup_ratio * total_steps)
    factor = lr_factor(args.schedule, warmup_steps, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    scaler = torch.amp.GradScaler(args.device.type, enabled=args.amp_dtype == torch.float16)
    return optimizer, scheduler, scaler


def lora_model(args, names):
    """(model, tokenizer, new: the modules made for the task, config: what rebuilds it): the encoder
    with a new head for `names` and LoRA on --targets, all else frozen but the head."""
    model, tokenizer, new = load_base_model(args.model, len(names), args.max_length)
    r, alpha = rank_and_alpha(model, new, args)
    adapted = inject_lora(model, r, alpha, args.dropout, args.targets, skip=new, init=args.init)
    for path in new:  # the head trains in full (to freeze it as well, delete these two lines)
        model.get_submodule(path).requires_grad_(True)
    if args.gradient_checkpointing:  # recompute activations in backward: less memory, more time
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    saved = 2 if args.init == "pissa" else 1  # PiSSA saves plain LoRA of rank 2r (lora.py)
    config = {"base_model": args.model, "r": saved * r, "alpha": saved * alpha, "trained_r": r,
              "init": args.init, "dropout": args.dropout, "targets": adapted,
              "max_length": args.max_length, "labels": names}
    model = cast_frozen_linears(model.to(args.device), args.amp_dtype).train()  # dropout on
    return model, tokenizer, new, config


def rank_and_alpha(model, new, args):
    """(r, alpha): --r, or with --r auto the largest rank whose adapters and head fit
    --max-trainable; --alpha, or 2r (the reference run's alpha / r of 2)."""
    r = args.r
    if r == "auto":
        per_rank = count_per_rank(model, target_paths(model, args.targets, new))
        head = sum(p.numel() for path in new for p in model.get_submodule(path).parameters())
        r = largest_rank(per_rank, head, args.max_trainable)
        if r < 1:
            raise DataError(f"--r auto: no rank fits --max-trainable {args.max_trainable:,}: the "
                            f"head alone has {head:,}, and each rank adds {per_rank:,}")
    return r, (2.0 * r if args.alpha is None else args.alpha)


def keep_best(args, model, new, config, evaluation):
    """The best so far: the trained tensors as they are now (to restore at the end), with their
    evaluation (for the final report), and the checkpoint on disk."""
    val_loss, val_acc, predicted = evaluation
    tensors = checkpoint_tensors(model, new)
    save_checkpoint(args.out, tensors, {**config, "best_val_accuracy": val_acc})
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"tensors": trained, "val_loss": val_loss, "predicted": predicted}


def check_finite(loss, what, step, args):
    """A loss that is no longer a number ends the run: nothing after it would mean anything."""
    if not math.isfinite(loss):
        raise FloatingPointError(f"the {what} became {loss} by step {step}; lower --lr (now "
                                 f"{args.lr:g}) or use --precision fp32. The best adapter so far "
                                 f"is kept in {args.out}")


def train(args, run):
    """The method, start to end: returns the best model (restored) and its validation accuracy."""
    torch.manual_seed(args.seed + run.rank)  # its own dropout masks (DDP copies rank 0's weights)
    args.device, args.amp_dtype = run.device, run.amp_dtype  # where, and in bf16, fp16 or fp32

    # data and model: labelled texts and a validation split; the encoder with a head and LoRA
    (train_texts, train_y), (val_texts, val_y), names = load_splits(
        args.data, args.val_size, args.seed, args.limit, args.label_names, args.num_labels)
    model, tokenizer, new, config = lora_model(args, names)
    pad_id = tokenizer.pad_token_id
    train_ids, train_y = tokenize(tokenizer, train_texts, args.max_length), torch.tensor(train_y)
    val_ids, val_y = tokenize(tokenizer, val_texts, args.max_length), torch.tensor(val_y)
    run.check_budget(model, new, config)  # prints where the parameters are; refuses too many
    step_model = run.wrap(model)  # what steps call: DDP's wrapper (torchrun), --compile's

    steps_per_epoch = math.ceil(len(train_ids) / args.batch_size)
    eval_every = args.eval_every or steps_per_epoch  # 0: at each epoch's end
    total_steps = min(steps_per_epoch * args.epochs, args.max_steps or math.inf)
    optimizer, scheduler, scaler = make_optimizer(model, args, total_steps)
    parts = (model, optimizer, scheduler, scaler)  # what a saved run holds, with the loop's state
    step, best_acc, best, bad_evals = run.start(parts, total_steps, steps_per_epoch)  # or resumed
    first_step, loss_sum = step, torch.zeros((), device=args.device)
    try:
        for epoch in range(step // steps_per_epoch, args.epochs):
            seed = args.seed + epoch  # another order each epoch
            batches = length_grouped_batches(train_ids.lengths, args.batch_size, seed)
            for rows in batches[step - epoch * steps_per_epoch:]:  # --resume: those not trained on
                if bad_evals >= args.patience or run.interrupted() or step >= total_steps:
                    break
                pieces = micro_batches(train_ids, train_y, rows, pad_id, run, args)
                loss_sum += train_step(step_model, pieces, optimizer, scheduler, scaler, args)
                step += 1
                if step % args.log_every == 0:  # the loop's one host sync: reading the loss
                    train_loss = loss_sum.item() / min(args.log_every, step - first_step)
                    check_finite(train_loss, "training loss", step, args)
                    run.log(step, train_loss=train_loss, lr=scheduler.get_last_lr()[0])
                    loss_sum.zero_()
                if step % eval_every == 0 or step == total_steps:
                    if run.rank == 0:  # torchrun: the main process evaluates, the others follow it
                        val_loss, val_acc, predicted = evaluate(model, val_ids, val_y, pad_id, args)
                        check_finite(val_loss, "validation loss", step, args)  # before keeping it
                        if val_acc > best_acc:  # the best so far: keep it
                            best_acc, bad_evals = val_acc, 0
                            best = keep_best(args, model, new, {**config, "step": step},
                                             (val_loss, val_acc, predicted))
                        else:  # one evaluation less of patience
                            bad_evals += 1
                        run.log(step, val_loss=val_loss, val_accuracy=val_acc, bad_evals=bad_evals)
                    bad_evals = run.agree(bad_evals)  # torchrun: every process stops together
                    run.save(parts, (step, best_acc, best, bad_evals))
    except torch.OutOfMemoryError:  # save first: --resume --grad-accum 2 goes on from here
        run.save(parts, (step, best_acc, best, bad_evals))
        raise
    finally:  # the progress bar closes; after Ctrl-C the run is saved and stops here
        run.stop(parts, (step, best_acc, best, bad_evals))
    run.finish()  # torchrun: the processes leave together
    if run.rank == 0:  # restore the best adapter; report its evaluation
        restore(model, best, step)
        run.report(best, best_acc, val_y, names)
    return model, best_acc


def restore(model, best, step):
    """Put the best adapter and head back into the model (`best` holds just those tensors)."""
    if best is None:  # resumed with no step left to take, before any evaluation
        raise DataError(f"no evaluation has run yet (step {step}); resume with a larger "
                        "--max-steps or --epochs")
    model.load_state_dict(best["tensors"], strict=False)


# --- operations: not needed to follow the method --------------------------------------------------
# The exit codes and the flags; `Run`: the device, torchrun, Ctrl-C, the log, saving, the report.

# what only the operations use is imported here, where they start
import argparse
import json
import os
import shlex
import signal
import sys
import threading

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from checkpoint import export_peft
from lora import TargetError, parameter_table
from predict import fail, pick_device, pick_precision, report_classes
from resume import LAST_STATE, METRICS_FILE, load_run, save_run
from checkpoint import ADAPTER_FILE, CONFIG_FILE, PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE
from data import short

OUR_FILES = {ADAPTER_FILE, CONFIG_FILE, LAST_STATE, METRICS_FILE, "curves.png", "confusion.png",
             PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE}  # what a run writes: these it may replace

def main(argv=None):
    """train(), with one line and an exit code for what stops it: 2 bad input, 1 a loss that is no
    longer a number or out of memory (after saving the run), 130 Ctrl-C (after saving it too)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that no temporary file is left
    args = parse_args(argv)
    try:
        run = Run(args)
        return train(args, run)
    except (DataError, TargetError) as e:
        fail(str(e))
    except FloatingPointError as e:
        fail(str(e), code=1)
    except KeyboardInterrupt as e:
        argv = sys.argv[1:] if argv is None else argv
        resume = shlex.join(argv + ([] if "--resume" in argv else ["--resume"]))
        print(f"{e}. Resume with:\n  python train.py {resume}")
        sys.exit(130)
    except torch.OutOfMemoryError:
        where = "before training" if run.saved_at is None else \
            f"at step {run.saved_at + 1}, a batch of {run.shape}; the run is saved: go on with " \
            "--resume --grad-accum 2 (the same steps in smaller pieces)"
        fail(f"out of memory {where} (peak {peak_memory(run.device)}); add --grad-accum 2 or "
             "--gradient-checkpointing, or lower --max-length or --eval-batch-size", code=1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--model", default="roberta-base", help="hub name or local folder of the base model")
    add("--data", default="ag_news", help="hub dataset, or a .csv/.jsonl/.parquet/.pkl file or "
                                          "save_to_disk folder with text,label columns")
    add("--out", default="checkpoint", help="folder for the best adapter and its config")
    add("--num-labels", type=at_least(1), default=None, help="default: from the data")
    add("--label-names", nargs="+", default=None, help="class names, in label order")
    # LoRA
    add("--r", type=rank_flag, default=2, help="rank of B @ A; auto: the largest under "
                                               "--max-trainable")
    add("--alpha", type=float, default=None, help="the update is scaled by alpha / r (default 2r)")
    add("--dropout", type=fraction, default=0.05, help="dropout on the adapter's input")
    add("--targets", nargs="+", default=["query", "value"], help="Linear layers to adapt: "
        "dotted suffixes of their paths (query, attention.output.dense, ...) or all-linear")
    add("--init", choices=["lora", "pissa"], default="lora", help="lora: A random, B zero; "
        "pissa: A, B from W0's top-r SVD (lora.py)")
    add("--max-trainable", type=at_least(1), default=None, help="refuse more trainable "
        "parameters (the course: 1000000)")
    # optimisation
    add("--lr", type=positive, default=1e-3, help="AdamW's peak rate (docs/experiments.md)")
    add("--schedule", choices=list(SCHEDULES), default="constant", help="the rate after warmup")
    add("--warmup-ratio", type=fraction, default=0.0, help="share of the steps spent warming up")
    add("--weight-decay", type=float, default=0.01)
    add("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm; 0: no clipping")
    add("--epochs", type=at_least(1), default=1)
    add("--max-steps", type=at_least(1), default=None, help="stop after this many steps")
    add("--batch-size", type=at_least(1), default=32, help="training batch (torchrun: global)")
    add("--grad-accum", type=at_least(1), default=1, help="split each batch into this many "
        "micro-batches: the same update in less memory")
    add("--gradient-checkpointing", action="store_true", help="recompute activations: less memory")
    add("--eval-batch-size", type=at_least(1), default=64)
    add("--max-length", type=at_least(2), default=512, help="longer texts are truncated")
    add("--val-size", type=int, default=640, help="rows split off the data for validation")
    add("--seed", type=int, default=42)
    add("--eval-every", type=at_least(0), default=200, help="steps between evaluations; 0: at "
        "each epoch's end")
    add("--patience", type=at_least(1), default=3, help="evaluations without a better one")
    add("--limit", type=at_least(1), default=None, help="use only this many rows (quick runs)")
    add("--log-every", type=at_least(1), default=50, help="steps between loss reports")
    add("--export-peft", metavar="DIR", default=None, help="also write it in PEFT's layout")
    add("--compile", action="store_true", help="torch.compile the model (CUDA graphs on a GPU)")
    add("--resume", action="store_true", help="continue the run saved in --out (same flags)")
    add("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
        help="auto: bf16 where computed natively, else fp16 on CUDA, else fp32")
    p.error = fail  # one line, exit code 2
    return check_args(p.parse_args(argv))


def at_least(low):
    def whole_number(value):
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes a whole number, not {value!r}") from None
        if number < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {number}")
        return number
    return whole_number


def positive(value):
    if not float(value) > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return float(value)


def fraction(value):
    if not 0 <= float(value) < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return float(value)


def rank_flag(value):
    if value == "auto":
        return value
    try:
        return at_least(1)(value)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(str(e).replace("takes a whole number",
                                                        "takes a whole number or auto"))


def check_args(args):
    """What argparse's types cannot check alone."""
    if args.r == "auto" and args.max_trainable is None:
        fail("--r auto needs --max-trainable N (the budget the rank is fitted to), e.g. "
             "--max-trainable 1000000")
    for flag, folder in (("--out", args.out), ("--export-peft", args.export_peft)):
        if folder and (os.path.lexists(folder) and not os.path.isdir(folder)
                       or os.path.islink(folder)):
            fail(f"{flag} {folder} is a file; give a folder for the checkpoint, e.g. {flag} run")
        theirs = sorted(set(os.listdir(folder)) - OUR_FILES) if folder and os.path.isdir(folder) \
            else []
        if theirs:
            fail(f"{flag} {folder} holds files that are not a run's ({short(theirs[0], 60)}, ...): "
                 "nothing there is overwritten; give a new folder")
    return args


class Run:
    """What a run needs besides the method: where it computes, its processes (torchrun), Ctrl-C,
    the progress bar and metrics.jsonl, saving and resuming (resume.py), the final report."""

    def __init__(self, args):
        self.args, self.step, self.saved_at, self.shape = args, 0, None, None
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.device = self.join_torchrun() if self.world > 1 else pick_device()
        self.amp_dtype = pick_precision(self.device, args.precision)
        cuda = self.device.type == "cuda"
        self.pad_to = 16 if cuda else 1  # a GPU: few shapes (for CUDA graphs); a CPU: exact
        self.pressed = threading.Event()
        if self.world == 1:  # under torchrun, Ctrl-C is torchrun's: every process ends at once
            signal.signal(signal.SIGINT, self.on_ctrl_c)

    def join_torchrun(self):
        """This process's device, after joining torchrun's process group."""
        if self.args.batch_size < self.world:
            raise DataError(f"--batch-size {self.args.batch_size} is the global batch; it must be "
                            f"at least the {self.world} processes")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if not torch.cuda.is_available():
            return torch.device("cpu")
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return torch.device("cuda", torch.cuda.current_device())

    def on_ctrl_c(self, signum, frame):
        """The loop stops between two steps and the run is saved; a second Ctrl-C stops at once."""
        self.pressed.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def interrupted(self):
        return self.pressed.is_set()

    def wrap(self, model):
        """The module the steps call: DDP averages gradients across processes; --compile fuses
        kernels (on a GPU with CUDA graphs: one per padded shape, at most --max-length / 16)."""
        if self.world > 1:
            cuda = self.device.type == "cuda"
            model = DistributedDataParallel(model, device_ids=[self.device.index] if cuda else None)
        if self.args.compile:
            torch._dynamo.config.cache_size_limit = max(8, self.args.max_length // 16 + 1)
            options = {"mode": "reduce-overhead", "dynamic": False} if self.pad_to > 1 else {}
            model = torch.compile(model, **options)
        return model

    def to_device(self, *tensors):
        """The tensors on the device: on CUDA from pinned memory, so the copy overlaps the GPU."""
        self.shape = tuple(tensors[0].shape)
        if self.device.type == "cuda":
            return tuple(t.pin_memory().to(self.device, non_blocking=True) for t in tensors)
        return tuple(t.to(self.device) for t in tensors)

    def start(self, parts, total_steps, steps_per_epoch):
        """The loop's state, fresh or --resume's (resume.load_run); the progress bar starts."""
        state = load_run(self.args, parts, self.rank, self.world)
        self.step, self.steps_per_epoch = state[0], steps_per_epoch
        if self.rank == 0:
            print(f"{total_steps:,} steps on {self.device} ({self.amp_dtype or 'fp32'})"
                  + (f" x {self.world} processes" if self.world > 1 else ""))
        self.bar = tqdm(total=total_steps, initial=self.step, desc="train", disable=self.rank != 0)
        return state

    def save(self, parts, loop_state):
        """last_state.pt (resume.save_run); every process takes part (its RNG is saved too)."""
        save_run(self.args, parts, loop_state, self.rank, self.world)
        self.saved_at = loop_state[0]

    def log(self, step, **row):
        """Progress: the bar moves on; a log or evaluation row goes to metrics.jsonl (main
        process only), and an evaluation is printed."""
        self.bar.update(step - self.step)
        self.step = step
        if self.rank != 0:
            return
        row = {"step": step, "epoch": round(step / self.steps_per_epoch, 3), **row,
               "elapsed_s": round(self.bar.format_dict["elapsed"], 2)}
        with open(os.path.join(self.args.out, METRICS_FILE), "a") as f:
            f.write(json.dumps(row) + "\n")
        if "val_accuracy" in row:
            best = " (best so far, saved)" if row["bad_evals"] == 0 else ""
            tqdm.write(f"step {step}: val loss {row['val_loss']:.4f}, val accuracy "
                       f"{row['val_accuracy']:.4f}{best}")
            if row["bad_evals"] >= self.args.patience:
                tqdm.write(f"early stop: no better validation accuracy in {self.args.patience} "
                           "evaluations")

    def agree(self, bad_evals):
        """The main process's count of evaluations without a better one (it alone evaluates),
        sent to every process, so that all stop together."""
        if self.world > 1:
            verdict = [bad_evals]
            dist.broadcast_object_list(verdict, src=0)
            bad_evals = verdict[0]
        return bad_evals

    def stop(self, parts, loop_state):
        """The progress bar closes and Ctrl-C is Python's again; after Ctrl-C the run is saved and
        stops (main prints how to go on)."""
        if hasattr(self, "bar"):
            self.bar.close()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if self.interrupted():
            self.save(parts, loop_state)
            raise KeyboardInterrupt(f"interrupted at step {loop_state[0]}; the latest state is in "
                                    f"{self.args.out}")

    def finish(self):
        """Leave the process group together: one that leaves while another still sends aborts."""
        if self.world > 1:
            dist.barrier()
            dist.destroy_process_group()

    def check_budget(self, model, new, config):
        check_budget(model, new, self.args, config, self.rank)

    def report(self, best, val_acc, labels, names):
        report(self.args, best, val_acc, labels, names, self.bar)


def check_budget(model, new, args, config, rank):
    """Print where the parameters are; with --max-trainable, refuse more before any training."""
    r, init = config["trained_r"], config["init"]
    if rank == 0:
        auto = args.r == "auto"
        chosen = f" (--r auto: the largest under {args.max_trainable:,})" if auto else ""
        saved = " (saved as plain LoRA of rank 2r)" if init == "pissa" else ""
        alpha = config["alpha"] * r / config["r"]
        print(f"LoRA r={r}{chosen}, alpha={alpha:g}, init {init}{saved}")
        print(parameter_table(model, new))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if args.max_trainable is not None and trainable > args.max_trainable:
        lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
        fits = largest_rank(lora // r, trainable - lora, args.max_trainable)
        raise DataError(f"r={r} on {', '.join(args.targets)} trains {trainable:,} parameters, "
                        f"above --max-trainable {args.max_trainable:,}; "
                        + (f"the largest r that fits is {fits}" if fits
                           else "no r fits: the head alone is too large"))


def report(args, best, val_acc, labels, names, bar):
    """The restored adapter's evaluation (kept from when it was the best: the validation split is
    not scored again): accuracy with an interval, per class, the files written, the speed."""
    low, high = bootstrap_interval(best["predicted"] == labels, args.seed)
    print(f"restored the best adapter: val loss {best['val_loss']:.4f}, val accuracy {val_acc:.4f} "
          f"(95% bootstrap interval {low:.4f}-{high:.4f}, {len(labels)} rows) -> {args.out}")
    report_classes(best["predicted"], labels.tolist(), names,
                   os.path.join(args.out, "confusion.png"), "the validation split")
    if args.export_peft:
        export_peft(args.out, args.export_peft)
        print(f"PEFT adapter: {args.export_peft}")
    curves = plot_curves(args.out)
    print(f"metrics: {os.path.join(args.out, METRICS_FILE)}"
          + (f", curves: {curves}" if curves else " (pip install matplotlib for curves.png)"))
    steps, seconds = bar.n - bar.initial, bar.format_dict["elapsed"]
    if steps:
        print(f"{seconds:.1f} s training, {steps / seconds:.2f} steps/s, "
              f"{steps * args.batch_size / seconds:.1f} samples/s, peak {peak_memory(args.device)}")


def bootstrap_interval(correct, seed, rounds=2000):
    """95% confidence interval of an accuracy: resample the rows with replacement, take
    percentiles."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(len(correct), (rounds, len(correct)), generator=generator)
    accuracies = correct.float()[rows].mean(dim=1)
    return torch.quantile(accuracies, 0.025).item(), torch.quantile(accuracies, 0.975).item()


def plot_curves(out):
    """curves.png beside metrics.jsonl: training loss and validation accuracy by step."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    with open(os.path.join(out, METRICS_FILE)) as f:
        rows = [json.loads(line) for line in f]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, key in zip(axes, ["train_loss", "val_accuracy"]):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), marker="." if key == "val_accuracy" else None)
        ax.set(title=key.replace("_", " "), xlabel="step")
    fig.tight_layout()
    path = os.path.join(out, "curves.png")
    fig.savefig(path, format="png", dpi=100)
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
