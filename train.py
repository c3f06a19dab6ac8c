"""How we learn: LoRA fine-tuning of a sequence classifier with a plain PyTorch loop.

    python train.py --r 2 --alpha 4 --lr 5e-6          # the reference run: roberta-base, ag_news
    python train.py --model DIR --data train.csv ...    # a local model folder and data file
    torchrun --nproc_per_node=4 train.py ...            # several GPUs: one process each (DDP)

`train()` is the method: a validation split; the model with a new head and LoRA, all else frozen;
an AdamW step on the cross-entropy per batch. A better validation figure (--select) keeps the
adapter and head, --patience evaluations without one stop the run; the best is put back at the end.
"""
import argparse
import functools
import itertools
import json
import math
import os
import shlex
import signal
import sys
import threading
import time
import traceback

import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import CHECKPOINT_FILES, check_merged_folder, export_merged, export_peft, is_number
from checkpoint import load_base_model, offline_if_unreachable, save_checkpoint
from data import InputError, load_splits, one_line, pad_batch, printable, refuse_unplain
from data import remove_stale, short, to_device, tokenize, training_batches, write_atomically
from lora import LoRALinear, PiSSALinear, TargetError, count_per_rank, inject_lora, largest_rank
from lora import parameter_table, target_paths, what_lora_learned
from predict import fail, pick_device, pick_precision, predict_logits, pyplot, report_classes
from predict import save_figure
from resume import LAST_STATE, METRICS_FILE, load_run, save_run


def lora_model(args, names):
    """(model, step_model, tokenizer, task_paths, config): a head for `names`, LoRA on --targets,
    all else frozen; step_model is what steps call (DDP, compiled); config, what rebuilds it."""
    model, tokenizer, task_paths = load_base_model(args.model, len(names), args.max_length)
    r, alpha = rank_and_alpha(model, task_paths, args)  # alpha: 2r unless --alpha; --r auto
    layer = PiSSALinear if args.init == "pissa" else LoRALinear  # --init pissa: optional, lora.py
    adapted = inject_lora(model, r, alpha, args.dropout, args.targets, skip=task_paths, layer=layer)
    for path in task_paths:  # the head (each module new for the task) trains in full
        model.get_submodule(path).requires_grad_(True)
    if args.gradient_checkpointing:  # recompute each layer's activations in backward: less memory
        checkpoint_activations(model)
    config = {"base_model": args.model, "r": r, "alpha": alpha, "init": args.init,
              "dropout": args.dropout, "targets": adapted, "max_length": args.max_length,
              "labels": names}
    check_budget(model, task_paths, config, args)  # prints where the parameters are
    model = step_model = model.to(args.device).train()  # train(): dropout on
    if args.ddp_world > 1:  # torchrun: DDP averages the processes' gradients in each backward
        step_model = torch.nn.parallel.DistributedDataParallel(model)
    if args.compile:  # fused kernels; on a GPU, CUDA graphs where --grad-accum allows them
        step_model = torch.compile(step_model, **compile_options(args))
    return model, step_model, tokenizer, task_paths, config


def make_optimizer(model, args, total_steps):
    """AdamW on the trainable tensors (weight decay on matrices only), the schedule of its rate,
    and the gradient scaler (on in fp16 alone, where small gradients would round to zero)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, fused=True)  # one kernel, no host sync
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args, total_steps))
    scaler = torch.amp.GradScaler(args.device.type, enabled=args.amp_dtype == torch.float16)
    return optimizer, scheduler, scaler


def micro_batches(tokens, labels, rows, pad_id, args):
    """The batch `rows` in --grad-accum pieces (input_ids, attention_mask, labels, share) on the
    device, padded exactly on a CPU, to multiples of 8 on a GPU (16 compiled: fewer graphs)."""
    # fewer rows than pieces (a short last batch): the rows repeated whole, a row for each piece
    rows = rows * math.ceil(args.grad_accum * args.ddp_world / len(rows))
    share = args.ddp_world / len(rows)  # a row's loss x world/N; DDP averages over world: 1/N
    multiple = 1 if args.device.type == "cpu" else 16 if args.compile else 8
    mine = rows[args.ddp_rank::args.ddp_world]  # torchrun: this process's rows of the batch
    for k in range(args.grad_accum):  # --grad-accum: its pieces
        piece = mine[k::args.grad_accum]
        input_ids, attention_mask = pad_batch(tokens, piece, pad_id, multiple, args.max_length)
        yield to_device(args.device, input_ids, attention_mask, labels[piece]) + (share,)


def train_step(model, pieces, optimizer, scheduler, scaler, args):
    """One AdamW step: per piece a forward under autocast, the cross-entropy, a backward (gradients
    add up); then clip, step, the next rate. Returns the loss differentiated, on the device: the
    batch's mean (class-weighted: sum of w * loss / rows); under torchrun, this process's term."""
    total = 0.0
    for input_ids, attention_mask, labels, share in pieces:
        with torch.autocast(args.device.type, args.amp_dtype, enabled=args.amp_dtype is not None):
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        loss = F.cross_entropy(logits.float(), labels, weight=args.loss_weight, reduction="sum")
        scaler.scale(loss * share).backward()  # scaled up in fp16 alone, where gradients underflow
        total = total + loss.detach() * share
    scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
    torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm or math.inf)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def evaluate(model, tokens, labels, pad_id, args):
    """(predicted classes, figures, score) on a labelled split: mean cross-entropy, share of rows
    right, mean F1 = 2TP / (2TP+FP+FN) of classes labelled or predicted; score: --select's."""
    logits = predict_logits(model, tokens, pad_id, args.eval_batch_size, args.device,
                            args.amp_dtype)  # predict.py's: in eval mode (no dropout), sorted
    predicted, k = logits.argmax(-1), logits.shape[1]
    hits = torch.bincount(labels[predicted == labels], minlength=k)  # per class: rows right
    counted = torch.bincount(predicted, minlength=k) + torch.bincount(labels, minlength=k)
    figures = {"val_loss": F.cross_entropy(logits, labels).item(),
               "val_accuracy": (predicted == labels).float().mean().item(),
               "val_macro_f1": (2 * hits / counted.clamp(min=1))[counted > 0].mean().item()}
    score = figures["val_macro_f1" if args.select == "macro-f1" else "val_accuracy"]
    return predicted, figures, score


def train(args):
    """The method, start to end: the best model (restored) and its --select figure. Where it runs
    is main()'s: args.device, args.amp_dtype, and under torchrun args.ddp_rank of args.ddp_world."""
    torch.manual_seed(args.seed + args.ddp_rank)  # head, A, dropout; DDP copies 0's head, A
    (train_texts, train_y), (val_texts, val_y), names = load_splits(args)  # or --val-data
    model, step_model, tokenizer, task_paths, config = lora_model(args, names)
    train_tokens, train_y = tokenize(tokenizer, train_texts, args.max_length), torch.tensor(train_y)
    val_tokens, val_y = tokenize(tokenizer, val_texts, args.max_length), torch.tensor(val_y)
    args.loss_weight = class_weights(train_y, len(names), args)  # --class-weights; None: alike
    steps_per_epoch = math.ceil(len(train_tokens) / args.batch_size)
    total_steps = min(steps_per_epoch * args.epochs, args.max_steps or math.inf)
    optimizer, scheduler, scaler = make_optimizer(model, args, total_steps)

    parts = (model, optimizer, scheduler, scaler)  # what a saved run holds besides the state
    step, best_score, best, bad_evals = 0, -1.0, None, 0  # the loop's state
    if args.resume:  # the saved state, tensors, optimizer, schedule and random streams
        step, best_score, best, bad_evals = load_run(args, parts, total_steps, len(val_y))
    batches = training_batches(train_tokens.lengths, args.batch_size, args.seed, args.epochs)
    bar = tqdm(itertools.islice(batches, step, total_steps),  # --resume: from `step` on
               total=total_steps, initial=step, desc="train", disable=args.ddp_rank != 0)
    log_or_stop = start_log(args, steps_per_epoch, total_steps, kept=best is not None)
    ctrl_c = on_ctrl_c(args)  # Ctrl-C sets it; the loop stops between two steps
    loss_sum, logged_at = torch.zeros((), device=args.device), step
    try:
        for rows in bar:
            pieces = micro_batches(train_tokens, train_y, rows, tokenizer.pad_token_id, args)
            loss_sum += train_step(step_model, pieces, optimizer, scheduler, scaler, args)
            step += 1
            if step % args.log_every == 0:  # the one place the loop reads the loss back
                log_or_stop(step, train_loss=loss_sum.item() / (step - logged_at),
                            lr=scheduler.get_last_lr()[0])  # and stops if it is no longer a number
                loss_sum, logged_at = loss_sum.zero_(), step
            if step % (args.eval_every or steps_per_epoch) == 0 or step == total_steps:
                if args.ddp_rank == 0:  # torchrun: the main process evaluates, the others wait
                    predicted, figures, score = evaluate(
                        model, val_tokens, val_y, tokenizer.pad_token_id, args)
                    bad_evals = 0 if score > best_score else bad_evals + 1  # 0: a new best
                    log_or_stop(step, **figures, bad_evals=bad_evals)  # a NaN loss stops
                    if bad_evals == 0:  # the best so far: keep it, on disk and in memory
                        best_score, best = score, keep_best(model, figures, predicted)
                        save_checkpoint(args.out, model, task_paths,
                                        {**config, "step": step, **figures})
                bad_evals = from_main_process(bad_evals, args)  # so that all stop together
                save_run(args, parts, (step, best_score, best, bad_evals))  # --resume from here
            if bad_evals >= args.patience:  # early stopping
                break
            if ctrl_c.is_set():  # Ctrl-C: stop between two steps
                raise KeyboardInterrupt(f"interrupted at step {step}")
    except (KeyboardInterrupt, torch.OutOfMemoryError) as e:  # save: --resume goes on from here
        e.step, e.saved = step, args.ddp_world == 1 and not in_evaluation(e)  # else: the last save
        if e.saved:
            save_run(args, parts, (step, best_score, best, bad_evals))
        raise
    finally:
        bar.close()
    if args.ddp_rank == 0:  # put the best adapter and head back, and report their evaluation
        model.load_state_dict(best["tensors"], strict=False)
        report(args, model, best, val_y, names, bar)
    return model, best_score


def keep_best(model, figures, predicted):
    """The best so far, in memory: the trained tensors as they are now (to put back at the end),
    with their evaluation (for the final report)."""
    tensors = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"tensors": tensors, **figures, "predicted": predicted}


# --- operations: not needed to follow the method --------------------------------------------------
# The exit codes and the flags; torchrun, --compile, Ctrl-C, the log, the budget, the report.
OUR_FILES = CHECKPOINT_FILES | {LAST_STATE, METRICS_FILE, "curves.png", "confusion.png",
                                "adapter_spectrum.png"}  # what a run writes: these it may replace


def main(argv=None):
    """train(), with one line and an exit code for what stops it: 2 bad input, 1 a loss that is no
    longer a number or out of memory (after saving the run), 130 Ctrl-C (after saving it too)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that no temporary file is left
    args = parse_args(argv)
    try:
        start_process(args)  # torchrun's process group, the device and its precision
        offline_if_unreachable(args.model, args.data, args.val_data)  # no minute of retries
        result = train(args)
        leave_torchrun(args)
        return result
    except (InputError, TargetError) as e:
        fail(str(e))
    except FloatingPointError as e:
        fail(str(e), code=1)
    except KeyboardInterrupt as e:
        argv = sys.argv[1:] if argv is None else argv
        resume = " ".join(map(shell_word, argv + ([] if "--resume" in argv else ["--resume"])))
        print(f"interrupted at step {getattr(e, 'step', 0)}; {saved_or_not(e, args)}. Resume "
              f"with:\n  python train.py {resume}")
        sys.exit(130)
    except torch.OutOfMemoryError as e:
        where = (f"evaluating step {e.step}" if in_evaluation(e) else f"at step {e.step + 1}"
                 if hasattr(e, "step") else "before training")
        fail(f"out of memory {where} (peak {peak_memory(args.device)}); {saved_or_not(e, args)}: "
             f"go on with --resume and one of --grad-accum {2 * args.grad_accum}, "
             "--gradient-checkpointing, a lower --max-length or --eval-batch-size", code=1)
    except RuntimeError as e:  # torchrun: another process stopped, mid-collective
        if getattr(args, "ddp_world", 1) == 1 or not raised_in_a_collective(e):
            raise
        fail(f"process {args.ddp_rank} of {args.ddp_world} stopped with the others: another one "
             f"ended first, and its own error line says why ({short(e, 80)})", code=1)
    except BaseException as e:  # the tokenizers library panics (a BaseException) on a bad regex
        if type(e).__name__ != "PanicException":
            raise
        fail(f"the tokenizer failed on a text ({short(e, 100)}): its files are not a tokenizer "
             "to read texts with")


def in_evaluation(e):
    """Whether `e` came out of evaluate(): its step is not yet judged, so the last save stands."""
    return any(f.f_code is evaluate.__code__ for f, _ in traceback.walk_tb(e.__traceback__))


def raised_in_a_collective(e):
    """Whether `e` came out of torch.distributed or DDP: a collective another process left."""
    frame = e.__traceback__
    while frame.tb_next:
        frame = frame.tb_next
    path = frame.tb_frame.f_code.co_filename.replace(os.sep, "/")
    return "torch/distributed/" in path or "torch/nn/parallel/" in path


def saved_or_not(e, args):
    """Whether the run that `e` stopped is saved for --resume, and as of which step, truthfully."""
    if getattr(e, "saved", False):
        return f"the run is saved in {one_line(args.out)}"
    if getattr(args, "saved_at", None) is not None:  # resume.save_run's, or load_run's
        return (f"the run is saved in {one_line(args.out)} as of step {args.saved_at}, its last "
                "evaluation")
    return "nothing is saved yet"


def shell_word(arg):
    """`arg` as a shell reads it back, on one line: bash's $'...' for a newline or the like."""
    if arg.isprintable():
        return shlex.quote(arg)
    return "$'" + arg.encode("unicode_escape").decode("ascii").replace("'", "\\'") + "'"


SCHEDULES = {  # the rate after warmup, a share of --lr, at `progress` from 0 to 1: add one here
    "constant": lambda progress: 1.0,
    "linear": lambda progress: 1.0 - progress,
    "cosine": lambda progress: 0.5 * (1 + math.cos(math.pi * progress)),
}


def lr_lambda(args, total_steps):
    """step -> the rate at that step, a share of --lr (LambdaLR's lr_lambda): up from 0 over
    --warmup-ratio of the steps, then SCHEDULES[--schedule] down to the last step."""
    warmup = round(args.warmup_ratio * total_steps)
    return functools.partial(rate_at, SCHEDULES[args.schedule], warmup, total_steps)


def rate_at(schedule, warmup, total_steps, step):
    if step < warmup:
        return step / warmup
    return schedule(min(1.0, (step - warmup) / max(1, total_steps - warmup)))


def checkpoint_activations(model):
    """Activations recomputed in backward by torch's non-reentrant checkpoint, which needs no
    gradient on the inputs (transformers turns one on: it is turned off)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.23 and later
        model.activation_checkpointing_enable()
    else:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    model.disable_input_require_grads()


def start_process(args):
    """Where this process runs: args.ddp_rank of args.ddp_world (torchrun starts a process per
    GPU, each with its RANK of WORLD_SIZE; 0 of 1 when run alone), args.device, args.amp_dtype."""
    args.ddp_rank, args.ddp_world = torchrun_environment()
    if args.ddp_world > 1 and args.batch_size < args.ddp_world:
        raise InputError(f"--batch-size {args.batch_size} is the global batch; it must be at "
                         f"least the {args.ddp_world} processes")
    if args.ddp_world > 1:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    args.device = pick_device()
    if args.device.type == "cuda" and args.ddp_world > 1:
        if int(os.environ["LOCAL_RANK"]) >= torch.cuda.device_count():
            raise InputError(f"LOCAL_RANK={os.environ['LOCAL_RANK']}, but this machine has "
                             f"{torch.cuda.device_count()} GPUs; start at most that many processes")
        args.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(args.device)
    args.amp_dtype = pick_precision(args.device, args.precision)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--model", default="roberta-base", help="hub name or local folder of the base model")
    add("--data", default="ag_news", help="hub dataset, or a .csv/.jsonl/.parquet/.pkl file or "
                                          "save_to_disk folder with text,label columns")
    add("--out", default="checkpoint", help="folder for the best adapter and its config")
    add("--num-labels", type=at_least(1), default=None, help="default: from the data")
    add("--label-names", nargs="+", default=None, help="class names, in label order: the "
        "submission's Labels")
    # LoRA
    add("--r", type=rank_flag, default=2, help="rank of B @ A; auto: the largest under "
                                               "--max-trainable")
    add("--alpha", type=float, default=None, help="the update is scaled by alpha / r (default 2r)")
    add("--dropout", type=fraction, default=0.05, help="dropout on the adapter's input")
    add("--targets", nargs="+", default=None, help="Linear layers to adapt: dotted suffixes of "
        "their paths (query, attention.output.dense, ...) or all-linear; default: the attention's "
        "query and value (lora.QUERY_VALUE)")
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
    add("--class-weights", nargs="+", default=None, metavar="W", help="weigh the cross-entropy: "
        "balanced (N / (K x the class's rows)), or one number per class")
    add("--select", choices=["accuracy", "macro-f1"], default="accuracy", help="the validation "
        "figure that keeps the best adapter and counts patience")
    add("--epochs", type=at_least(1), default=1)
    add("--max-steps", type=at_least(1), default=None, help="stop after this many steps")
    add("--batch-size", type=at_least(1), default=32, help="training batch (torchrun: global)")
    add("--grad-accum", type=at_least(1), default=1, help="split each batch into this many "
        "micro-batches: the same update in less memory")
    add("--gradient-checkpointing", action="store_true", help="recompute activations: less memory")
    add("--eval-batch-size", type=at_least(1), default=64)
    add("--max-length", type=at_least(2), default=512, help="longer texts are truncated")
    add("--val-size", type=at_least(1), default=640, help="rows split off the data for validation")
    add("--val-data", default=None, help="a file of the same classes as --data, its validation "
        "split: nothing is split off --data")
    add("--seed", type=int, default=42)
    add("--eval-every", type=at_least(0), default=200, help="steps between evaluations; 0: at "
        "each epoch's end")
    add("--patience", type=at_least(1), default=3, help="evaluations without a better one")
    add("--limit", type=at_least(1), default=None, help="use only this many rows (quick runs)")
    add("--log-every", type=at_least(1), default=50, help="steps between loss reports")
    add("--export-peft", metavar="DIR", default=None, help="also write it in PEFT's layout")
    add("--export-merged", metavar="DIR", default=None, help="also write a transformers model "
        "folder, the adapters merged, with the class names (pipeline() loads it)")
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
    weights = args.class_weights or ["balanced"]
    if weights != ["balanced"] and not all(is_weight(w) for w in weights):
        fail(f"--class-weights takes balanced or numbers above 0 and at most 1e6, one per class, "
             f"not {short(' '.join(weights), 60)}")
    if args.r == "auto" and args.max_trainable is None:
        fail("--r auto needs --max-trainable N (the budget the rank is fitted to), e.g. "
             "--max-trainable 1000000")
    if args.export_merged:
        try:
            check_merged_folder(args.export_merged, args.out, args.export_peft, args.model,
                                args.data, args.val_data)
        except InputError as e:
            fail(str(e))
    for flag, folder in (("--out", args.out), ("--export-peft", args.export_peft)):
        if folder and (os.path.lexists(folder) and not os.path.isdir(folder)
                       or os.path.islink(folder)):
            fail(f"{flag} {folder} is a file; give a folder for the checkpoint, e.g. {flag} run")
        theirs = sorted(set(os.listdir(folder)) - OUR_FILES) if folder and os.path.isdir(folder) \
            else []
        if theirs:
            fail(f"{flag} {folder} holds files that are not a run's ({short(theirs[0], 60)}, ...): "
                 "nothing there is overwritten; give a new folder")
        try:  # before any work: a link is not written through, a pipe or a folder not replaced
            for name in sorted(OUR_FILES) if folder and os.path.isdir(folder) else []:
                refuse_unplain(os.path.join(folder, name))
        except InputError as e:
            fail(f"{flag}: {e}")
    return args


TORCHRUN_NUMBERS = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"]


def is_weight(text):
    try:
        return 0 < float(text) <= 1e6  # relative weights: larger would overflow fp32's loss
    except ValueError:
        return False


def class_weights(labels, num_labels, args):
    """--class-weights, on the device: None (every row alike), the K numbers given, or balanced."""
    return None if args.class_weights is None else weights_of(labels, num_labels, args)


def weights_of(labels, num_labels, args):
    """balanced: N / (K x the class's rows) over the training split (a class with no row: 1).
    The loss is then sum(w_y x loss) / N, not / sum(w): balanced weights average 1 over the rows."""
    if args.class_weights == ["balanced"]:
        counts = torch.bincount(labels, minlength=num_labels).double()
        weights = torch.where(counts > 0, len(labels) / (num_labels * counts), 1.0)
    elif len(args.class_weights) == num_labels:
        weights = torch.tensor([float(w) for w in args.class_weights])
    else:
        raise InputError(f"--class-weights: {len(args.class_weights)} weights for {num_labels} "
                         "classes; give one per class, in label order, or balanced")
    return weights.float().to(args.device)


def torchrun_environment():
    """(RANK, WORLD_SIZE) as torchrun sets them, (0, 1) when neither is set. One line unless they
    are what torchrun sets: whole numbers, RANK below WORLD_SIZE, and with more than one process
    LOCAL_RANK, MASTER_ADDR and MASTER_PORT (where the processes meet) as well."""
    env = os.environ
    wrong = [f"{name}={printable(env[name], 20)}" for name in TORCHRUN_NUMBERS
             if name in env and not (env[name].isascii() and env[name].isdigit()
                                     and len(env[name]) <= 5)]
    if not wrong:
        rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
        if not 0 <= rank < world:
            wrong = [f"RANK={rank} of WORLD_SIZE={world}"]
        elif world > 1:  # what init_process_group reads: torchrun sets every one
            wrong = [f"no {name}" for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
                     if name not in env]
    if wrong:
        raise InputError(f"the environment is not a torchrun process's ({', '.join(wrong)}); "
                         "run several processes as torchrun --nproc_per_node=N train.py ..., or "
                         "one with RANK, WORLD_SIZE and LOCAL_RANK unset")
    return rank, world


def from_main_process(value, args):
    """The main process's value, on every process (torchrun); as it is when run alone."""
    box = [value]
    if args.ddp_world > 1:
        torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def leave_torchrun(args):
    """Leave the process group together: one that leaves while another still sends aborts."""
    if args.ddp_world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def compile_options(args):
    """torch.compile's options: on a GPU, CUDA graphs (one per padded width), but not with
    --grad-accum, where the next piece's replay would overwrite the gradients of the last."""
    torch._dynamo.config.cache_size_limit = max(8, args.max_length // 16 + 1)
    if args.device.type != "cuda":
        return {}
    return {"mode": "reduce-overhead" if args.grad_accum == 1 else "default", "dynamic": False}


def on_ctrl_c(args):
    """An Event that Ctrl-C sets, read by the loop between steps; a second Ctrl-C stops at once,
    saving nothing. Under torchrun, Ctrl-C is torchrun's: every process ends at once."""
    pressed = threading.Event()
    if args.ddp_world == 1:
        signal.signal(signal.SIGINT, lambda *_: stop_now() if pressed.is_set() else pressed.set())
    return pressed


def stop_now():
    print("interrupted twice: stopped at once, saving nothing", file=sys.stderr)
    raise SystemExit(130)


def start_log(args, steps_per_epoch, total_steps, kept):
    """log_or_stop(step, **row): a row of metrics.jsonl (emptied first, unless --resume), an
    evaluation printed; a loss no longer a number ends the run, saying if an adapter was kept."""
    path, started = open_log(args, total_steps), time.time()
    def log_or_stop(step, **row):
        nonlocal kept
        kept = check_finite(row, step, kept, args)
        write_row(args, path, {"step": step, "epoch": round(step / steps_per_epoch, 3), **row,
                               "elapsed_s": round(time.time() - started, 2)})
    return log_or_stop


def write_row(args, path, row):
    """The row appended to metrics.jsonl, and an evaluation's printed: by the main process."""
    if args.ddp_rank == 0:
        with open(path, "a", opener=no_links) as f:
            f.write(json.dumps(row) + "\n")
        print_evaluation(row, args)


def open_log(args, total_steps):
    """The path of metrics.jsonl, in --out (made), emptied unless --resume; an earlier run's
    pictures removed; and the run's first line, from the main process."""
    path = os.path.join(args.out, METRICS_FILE)
    if args.ddp_rank != 0:
        return path
    os.makedirs(args.out, exist_ok=True)  # a link or a pipe in it is refused by check_args
    if not (args.resume and os.path.isfile(path)):
        write_atomically(path, lambda f: None)  # emptied
    for picture in ("curves.png", "confusion.png"):  # drawn at the end, if at all: none is stale
        remove_stale(os.path.join(args.out, picture))
    print(f"{total_steps:,} steps on {args.device} ({args.amp_dtype or 'fp32'})"
          + (f" x {args.ddp_world} processes" if args.ddp_world > 1 else ""))
    return path


def no_links(path, flags):
    """open()'s opener that follows no link: metrics.jsonl is appended to, never through one."""
    return os.open(path, flags | os.O_NOFOLLOW, 0o666)


def print_evaluation(row, args):
    if "val_accuracy" in row:
        best = " (best so far, saved)" if row["bad_evals"] == 0 else ""
        f1 = f", val macro-F1 {row['val_macro_f1']:.4f}" if args.select == "macro-f1" else ""
        tqdm.write(f"step {row['step']}: val loss {row['val_loss']:.4f}, val accuracy "
                   f"{row['val_accuracy']:.4f}{f1}{best}")
        if row["bad_evals"] >= args.patience:
            tqdm.write(f"early stop: no better validation {args.select} in {args.patience} "
                       "evaluations")


def check_finite(row, step, kept, args):
    """A loss that is no longer a number ends the run: nothing after it would mean anything.
    Returns whether an adapter is kept, with this row's evaluation."""
    for key, what in (("train_loss", "training loss"), ("val_loss", "validation loss")):
        if key in row and not math.isfinite(row[key]):
            raise FloatingPointError(
                f"the {what} became {row[key]} by step {step}; lower --lr (now {args.lr:g}) or use "
                "--precision fp32; " + (f"the best adapter so far is kept in {one_line(args.out)}"
                                        if kept else "no evaluation has kept an adapter yet"))
    return kept or row.get("bad_evals") == 0


def rank_and_alpha(model, task_paths, args):
    """(r, alpha): --r, or with --r auto the largest rank whose adapters and head fit
    --max-trainable; --alpha, or 2r (the reference run's alpha / r of 2)."""
    r = largest_rank_that_fits(model, task_paths, args) if args.r == "auto" else args.r
    return r, (2.0 * r if args.alpha is None else args.alpha)


def largest_rank_that_fits(model, task_paths, args):
    per_rank = count_per_rank(model, target_paths(model, args.targets, task_paths))
    head = sum(p.numel() for path in task_paths for p in model.get_submodule(path).parameters())
    r = largest_rank(per_rank, head, args.max_trainable)
    if r < 1:
        raise InputError(f"--r auto: no rank fits --max-trainable {args.max_trainable:,}: the "
                         f"head alone has {head:,}, and each rank adds {per_rank:,}")
    return r


def check_budget(model, task_paths, config, args):
    """Print where the parameters are; with --max-trainable, refuse more before any training."""
    if args.ddp_rank == 0:
        auto = f" (--r auto: the largest under {args.max_trainable:,})" if args.r == "auto" else ""
        print(f"LoRA r={config['r']}{auto}, alpha={config['alpha']:g}, init {config['init']}")
        print(parameter_table(model, task_paths))
    refuse_over_budget(model, config["r"], args)


def refuse_over_budget(model, r, args):
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if args.max_trainable is not None and trainable > args.max_trainable:
        lora = [(n, p) for n, p in model.named_parameters() if ".lora_" in n]
        count = sum(p.numel() for _, p in lora)
        fits = largest_rank(count // r, trainable - count, args.max_trainable)
        names = args.targets or sorted({n.split(".lora_")[0].rsplit(".")[-1] for n, _ in lora})
        raise InputError(f"r={r} on {', '.join(names)} trains {trainable:,} parameters, above "
                         f"--max-trainable {args.max_trainable:,}; "
                         + (f"the largest r that fits is {fits}" if fits
                            else "no r fits: the head alone is too large"))


def report(args, model, best, labels, names, bar):
    """The best's evaluation (kept, not scored again), what LoRA learned, the files, the speed."""
    report_evaluation(args, best, labels, names)
    report_update(model, args)
    report_files_and_speed(args, bar)


def report_evaluation(args, best, labels, names):
    low, high = bootstrap_interval(best["predicted"] == labels, args.seed)
    print(f"restored the best adapter: val loss {best['val_loss']:.4f}, val accuracy "
          f"{best['val_accuracy']:.4f} (95% bootstrap interval {low:.4f}-{high:.4f}, {len(labels)} "
          f"rows), macro-F1 {best['val_macro_f1']:.4f} -> {one_line(args.out)}")
    report_classes(best["predicted"], labels.tolist(), names,
                   os.path.join(args.out, "confusion.png"), "the validation split")


def report_update(model, args):
    """What LoRA learned, per adapted layer: how large the update is against the pretrained
    weight, its singular values, and how much it amplifies the directions it shares with W0 (Hu
    et al., 2021, section 7); adapter_spectrum.png in --out draws them."""
    layers = what_lora_learned(model)
    print("what LoRA learned: |dW| / |W0| (Frobenius), the amplification of W0's directions, "
          "dW's singular values")
    for path, ratio, values, amplification in layers[:MAX_REPORTED]:
        shown = " ".join(f"{v:.3g}" for v in values[:8])
        print(f"  {one_line(path)[-60:]:<60} {ratio:9.2e}  x{amplification:<7.3g} {shown}")
    if len(layers) > MAX_REPORTED:
        print(f"  ... and {len(layers) - MAX_REPORTED:,} more layers (adapter_spectrum.png)")
    picture = plot_spectrum(layers, os.path.join(args.out, "adapter_spectrum.png"))
    if picture:
        print(f"adapter spectrum: {one_line(picture)}")


MAX_REPORTED = 96  # adapted layers printed (RoBERTa-base's query and value: 24)


def report_files_and_speed(args, bar):
    """The exports and curves.png, if asked for and possible; steps and samples a second."""
    if args.export_peft:
        export_peft(args.out, args.export_peft)
        print(f"PEFT adapter: {one_line(args.export_peft)}")
    if args.export_merged:
        export_merged(args.out, args.export_merged)
        print(f"merged model (transformers' folder): {one_line(args.export_merged)}")
    curves = plot_curves(args.out)
    print(f"metrics: {one_line(os.path.join(args.out, METRICS_FILE))}"
          + (f", curves: {one_line(curves)}" if curves else
             " (pip install matplotlib for curves.png)"))
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
    points = curve_points(os.path.join(out, METRICS_FILE))
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, key in zip(axes, ["train_loss", "val_accuracy"]):
        if points[key]:
            ax.plot(*zip(*points[key]), marker="." if key == "val_accuracy" else None)
        ax.set(title=key.replace("_", " "), xlabel="step")
    return save_figure(plt, fig, os.path.join(out, "curves.png"))


def plot_spectrum(layers, path):
    """adapter_spectrum.png: per adapted layer, |dW| / |W0| (left) and dW's singular values
    (right); at most 400 layers drawn (needs matplotlib)."""
    plt = pyplot()
    if plt is None:
        return None
    layers = layers[:400]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.bar(range(len(layers)), [ratio for _, ratio, _, _ in layers])
    left.set(title="|dW| / |W0| per adapted layer", xlabel="adapted layer, in model order")
    for i, (_, _, values, _) in enumerate(layers):
        right.scatter([i] * len(values), values, s=8, c=range(len(values)), cmap="viridis")
    right.set(title="singular values of dW (largest: dark)", xlabel="adapted layer", yscale="log")
    if len(layers) <= 64:  # each named: "3 value", the layer's number and the adapted layer's
        names = [one_line(layer_and_name(path))[:16] for path, _, _, _ in layers]
        for ax in (left, right):
            ax.set_xticks(range(len(layers)), names, rotation=90, fontsize=7)
    return save_figure(plt, fig, path)


def curve_points(path, most=2**26):
    """{key: [(step, value)]} of metrics.jsonl's rows. A line that is not such a row (cut by a
    kill before --resume appended to it, or a file from elsewhere) is skipped; past `most` bytes
    (a million rows) nothing is read."""
    points = {"train_loss": [], "val_accuracy": []}
    with open(path, "rb", opener=no_links) as f:
        lines = f.readlines() if os.fstat(f.fileno()).st_size <= most else []
    for line in lines:
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):  # not JSON, or 100,000 brackets deep
            continue
        for key in points if isinstance(row, dict) and is_number(row.get("step")) else []:
            if is_number(row.get(key)):
                points[key].append((row["step"], row[key]))
    return points


def layer_and_name(path):
    """"bert.encoder.layer.3.attention.self.value" -> "3 value"."""
    parts = path.split(".")
    numbers = [p for p in parts if p.isdigit()]
    return f"{numbers[-1]} {parts[-1]}" if numbers else parts[-1]


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
