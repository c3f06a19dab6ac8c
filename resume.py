"""A run, saved and resumed: `last_state.pt` in --out holds everything --resume needs.

    save_run(args, (model, optimizer, scheduler, scaler), (step, best_score, best, bad_evals))
    step, best_score, best, bad_evals = load_run(args, parts, total_steps, len(val_y))

What is saved: the trained tensors as they train (rank r), the loop's state (the step, the best
--select figure, the best tensors with their evaluation, the patience used), the optimizer, schedule
and scaler, every process's random state (its dropout stream), and the flags. Resumed with the same
flags on the same device, a run ends with the tensors a run never stopped ends with, bit for bit on
a CPU (tested). --grad-accum, --compile and --eval-batch-size may change on resume; the steps are
then the same up to rounding. The file is read as data (`weights_only`), its size bounded first, its
structure and flags checked before anything is used.
"""
import io
import os
import zipfile

import torch
import torch.distributed as dist

from data import InputError, printable, short, write_atomically

LAST_STATE = "last_state.pt"
LAST_STATE_FORMAT = 4  # 4: best_score, the --select figure (3: best_acc)
RESUMABLE_CHANGES = {"resume", "epochs", "max_steps", "patience", "log_every", "compile",
                     "export_peft", "export_merged", "grad_accum", "gradient_checkpointing",
                     "eval_batch_size"}
METRICS_FILE = "metrics.jsonl"
FIGURES = ("val_loss", "val_accuracy", "val_macro_f1")  # a kept best's evaluation (train.evaluate)


def save_run(args, parts, loop_state):
    """last_state.pt, written atomically by the main process (every process sends its RNG)."""
    state = run_state(args, parts, loop_state, rng_states(args.ddp_world))
    args.saved_at = loop_state[0]  # what --resume would go on from (main says so if a run stops)
    if args.ddp_rank == 0:
        saved = io.BytesIO()  # torch.save's writer ends a full disk in a RuntimeError: write bytes
        torch.save(state, saved)
        write_atomically(os.path.join(args.out, LAST_STATE), lambda f: f.write(saved.getbuffer()),
                         mode="wb")


def run_state(args, parts, loop_state, rngs):
    (model, optimizer, scheduler, scaler), (step, best_score, best, bad_evals) = parts, loop_state
    return {"format": LAST_STATE_FORMAT, "step": step, "best_score": best_score, "best": best,
            "bad_evals": bad_evals, "trained": trained_tensors(model), "args": flags_of(args),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "rng": rngs}


def load_run(args, parts, total_steps, val_rows):
    """(step, best_score, best, bad_evals) of the run saved in --out, whose tensors, optimizer,
    schedule, scaler and random streams are loaded into `parts` and this process."""
    state = read_state(args, parts[0], total_steps, val_rows)
    put_back(args, parts, state)  # and says so
    args.saved_at = state["step"]
    return state["step"], state["best_score"], state["best"], state["bad_evals"]


def put_back(args, parts, state):
    """The saved tensors, optimizer, schedule, scaler and this process's random streams."""
    model, optimizer, scheduler, scaler = parts
    try:  # a state of the right structure whose parts do not fit: one line too
        model.load_state_dict(state["trained"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"][args.ddp_rank]["cpu"])  # this process's own stream
        if state["rng"][args.ddp_rank]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["rng"][args.ddp_rank]["cuda"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise InputError(f"{args.out}: the saved training state does not fit this run "
                         f"({type(e).__name__}: {short(e, 100)}); run without --resume to start "
                         "afresh") from None
    if args.ddp_rank == 0:
        best = f"{state['best_score']:.4f}" if state["best_score"] >= 0 else "none yet"
        print(f"resumed from {args.out} at step {state['step']} (best val {args.select}: {best})")


# --- checks: the file is as save_run wrote it, for this model, with these flags -----------------

def read_state(args, model, total_steps, val_rows):
    """The saved state, after checking its size, its structure and the flags; refused too if it
    has no step left to take and no evaluation has run (nothing to restore)."""
    world = args.ddp_world
    path = os.path.join(args.out, LAST_STATE)
    fix = "run without --resume to start afresh"
    if not os.path.isfile(path):
        raise InputError(f"{args.out}: no saved training state to resume; {fix}")
    trained = trained_tensors(model)
    most = 64 * sum(t.numel() * 4 for t in trained.values()) + 2**26  # tensors, Adam, best, RNG
    try:
        if os.path.islink(path) or os.path.getsize(path) > most:
            raise ValueError(f"a link, or over {most:,} bytes: more than this model's state holds")
        with zipfile.ZipFile(path) as archive:  # torch.save's format: sizes are in its directory
            members = archive.infolist()
            if len(members) > 10_000 or sum(m.file_size for m in members) > most:
                raise ValueError(f"over {most:,} bytes unpacked: more than this model's state")
        state = torch.load(path, weights_only=True, map_location="cpu")  # data, never code
    except Exception as e:
        raise InputError(f"{args.out}: the saved training state is unreadable "
                         f"({type(e).__name__}: {short(e, 100)}); {fix}") from None
    if not isinstance(state, dict) or state.get("format") != LAST_STATE_FORMAT:
        raise InputError(f"{args.out}: the saved training state was written by another version of "
                         f"train.py; {fix}")
    check_structure(args, state, trained, model.config.num_labels, val_rows)
    saved, now = state["args"], flags_of(args)
    changed = [f"--{printable(k, 30).replace('_', '-')} was {printable(saved.get(k), 80)}, "
               f"now {printable(now.get(k), 80)}"
               for k in sorted(set(saved) | set(now), key=str)[:100]
               if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k)]
    if len(state["rng"]) != world:
        changed.append(f"{len(state['rng'])} processes, now {world}")
    if changed:
        raise InputError("--resume needs the flags of the run it continues: "
                         + "; ".join(changed[:5]))
    if state["best"] is None and state["step"] >= total_steps:
        raise InputError(f"{args.out}: no evaluation has run yet (step {state['step']}); resume "
                         "with a larger --max-steps or --epochs")
    return state


def check_structure(args, state, trained, num_labels, val_rows):
    """One line unless every part has the type and the tensors the shapes that save_run gives."""
    kinds = {"step": int, "best_score": float, "bad_evals": int, "trained": dict, "args": dict,
             "optimizer": dict, "scheduler": dict, "scaler": dict, "rng": list}
    wrong = [k for k, kind in kinds.items() if not isinstance(state.get(k), kind)]
    if not wrong and (state["step"] < 0 or state["bad_evals"] < 0
                      or not all(isinstance(k, str) for k in state["args"])):
        wrong.append("step, patience or flags")
    best = state.get("best")
    if best is not None and not right_best(best, trained, num_labels, val_rows):
        wrong.append("best")
    saved = state.get("trained") if isinstance(state.get("trained"), dict) else {}
    if set(saved) != set(trained) or any(not isinstance(saved[n], torch.Tensor)
                                         or saved[n].shape != t.shape for n, t in trained.items()):
        wrong.append("trained tensors of another model")
    if not wrong and not all(isinstance(r, dict) and isinstance(r.get("cpu"), torch.Tensor)
                             for r in state["rng"]):
        wrong.append("rng")
    if wrong:
        raise InputError(f"{args.out}: the saved training state is not one train.py wrote for this "
                         f"model ({', '.join(wrong)}); run without --resume to start afresh")


def right_best(best, trained, num_labels, val_rows):
    """Whether `best` is what train.keep_best makes: trained tensors of their shapes, its figures
    as floats, and a class 0..K-1 for each validation row (the final report reads them)."""
    if not (isinstance(best, dict) and {"tensors", "predicted", *FIGURES} <= set(best)):
        return False
    tensors, predicted = best["tensors"], best["predicted"]
    return isinstance(tensors, dict) and all(isinstance(best[k], float) for k in FIGURES) and all(
        n in trained and isinstance(t, torch.Tensor) and t.shape == trained[n].shape
        for n, t in tensors.items()) and isinstance(predicted, torch.Tensor) and \
        predicted.dtype == torch.int64 and predicted.shape == (val_rows,) and \
        bool(((predicted >= 0) & (predicted < num_labels)).all())


def trained_tensors(model):
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def flags_of(args):
    """The flags as saved: short reprs, so that comparing them costs what a flag is long."""
    return {k: short(v, 200) for k, v in vars(args).items()
            if k not in ("device", "amp_dtype", "ddp_rank", "ddp_world", "saved_at", "loss_weight")}


def rng_states(world):
    """Every process's RNG state (its dropout stream), gathered: each resumes its own."""
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    mine = {"cpu": torch.get_rng_state(), "cuda": cuda}
    if world == 1:
        return [mine]
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    return gathered
