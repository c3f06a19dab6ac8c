"""How we answer: rebuild the base model, load the trained adapter, fold it in, label every text.

    python predict.py test.pkl [--checkpoint checkpoint] [--out submission.csv] [--batch-size 64]

Writes `ID,Label` rows, IDs 0..N-1 in input order. If the input has a `label` column too, prints
the accuracy and, per class, precision, recall, F1 and the confusion matrix. The input is read,
tokenized and predicted a chunk at a time, so memory does not grow with its length.
`load_model(checkpoint)` is the one way to get a trained model back.
"""
import argparse
import csv
import itertools
import json
import os
import sys

import torch
import transformers
from safetensors.torch import load_file, save as safetensors_bytes
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from data import DataError, pad_batch, read_text_chunks, short, sorted_batches, tokenize, write_atomically
from lora import inject_lora, merge_lora

ADAPTER_FILE, CONFIG_FILE = "adapter.safetensors", "config.json"


def load_model(checkpoint, device="cpu", merge=True, dtype=None):
    """(model, tokenizer, config) from a checkpoint folder written by train.py (or a PEFT adapter).

    The base model is rebuilt as in training: pretrained encoder, new head, LoRA on the same
    targets; then the trained tensors (adapters and head) are loaded on top. With merge=True each
    adapter is folded into its weight, W0 + (alpha/r) B A: inference then costs exactly what the
    base model costs. With a dtype (the autocast dtype), the Linear layers are stored in it.
    """
    config, trained = read_checkpoint(checkpoint)
    base_model, labels, r, alpha, targets = (config[k] for k in ("base_model", "labels", "r", "alpha", "targets"))
    tokenizer = load_tokenizer(base_model)
    model = inject_lora(load_base_model(base_model, len(labels)), r, alpha, targets=targets)
    expected = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    if {n: t.shape for n, t in trained.items()} != expected:  # other targets, r or label count than config says
        raise DataError(f"{checkpoint}: its tensors do not fit {base_model} with r={r}, targets={targets}, "
                        f"{len(labels)} labels; retrain, or pick the checkpoint that goes with it")
    model.load_state_dict(trained, strict=False)
    if merge:
        merge_lora(model)
    model.requires_grad_(False)  # nothing trains from here on
    return cast_frozen_linears(model.to(device), dtype).eval(), tokenizer, config


@torch.inference_mode()
def predict_logits(model, tokens, pad_id, batch_size, device, amp_dtype=None):
    """Logits (N, num_labels) for every text of `tokens`, in input order.

    Batches are sorted by length so each one pads little; results go back to their input rows.
    The model is left in the mode it was in.
    """
    was_training = model.training
    model.eval()  # no dropout
    logits = torch.empty(len(tokens), model.config.num_labels, device=device)
    for rows in sorted_batches(tokens.lengths, batch_size):
        input_ids, attention_mask = pad_batch(tokens, rows, pad_id)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        logits[torch.tensor(rows, device=device)] = out.float()
    model.train(was_training)
    return logits.cpu()


def main(argv=None):
    args = parse_args(argv)
    device = pick_device()
    amp_dtype = pick_precision(device, args.precision)
    try:
        chunks = read_text_chunks(args.input)
        first = next(chunks)  # bad input is found before the model is loaded
        model, tokenizer, config = load_model(args.checkpoint, device, dtype=amp_dtype)
        max_length = min(config["max_length"], model_max_length(tokenizer))
        answers, labels = [], []  # one tensor of predicted classes per chunk, and its labels (or None)

        def write(f):  # a chunk at a time: tokenize, predict, write its rows
            out = csv.writer(f)
            out.writerow(["ID", "Label"])
            written = 0
            for texts, chunk_labels in itertools.chain([first], chunks):
                tokens = tokenize(tokenizer, texts, max_length, cache=False)
                predicted = predict_logits(model, tokens, tokenizer.pad_token_id, args.batch_size, device,
                                           amp_dtype).argmax(-1)
                out.writerows(enumerate(predicted.tolist(), start=written))
                written += len(predicted)
                answers.append(predicted)
                labels.append(chunk_labels)
        write_atomically(args.out, write)
    except DataError as e:
        fail(str(e))
    predicted = torch.cat(answers)
    print(f"wrote {len(predicted)} predictions to {args.out}")
    if all(chunk is not None for chunk in labels):
        report_labelled(predicted, [y for chunk in labels for y in chunk], config["labels"],
                        os.path.dirname(os.path.abspath(args.out)))


def report_labelled(predicted, labels, names, folder):
    """Accuracy, per-class precision/recall/F1 and the confusion matrix, when the labels are 0..K-1."""
    if not all(isinstance(y, int) and not isinstance(y, bool) and 0 <= y < len(names) for y in labels):
        return
    confusion = confusion_matrix(predicted, torch.tensor(labels), len(names))
    correct = int(confusion.diag().sum())
    print(f"accuracy {correct / len(labels):.4f} ({correct}/{len(labels)})")
    print(class_report(confusion, names))
    picture = plot_confusion(confusion, names, os.path.join(folder, "confusion.png"))
    if picture:
        print(f"confusion matrix: {picture}")


def confusion_matrix(predicted, labels, num_labels):
    """counts[true class, predicted class], as one bincount of true * K + predicted."""
    return torch.bincount(labels * num_labels + predicted, minlength=num_labels ** 2).reshape(num_labels, num_labels)


def class_report(confusion, names):
    """Per class: precision (of what we called it), recall (of what it was), F1, rows; then the matrix."""
    hits, called, actual = confusion.diag().double(), confusion.sum(0).double(), confusion.sum(1).double()
    precision, recall = hits / called.clamp(min=1), hits / actual.clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    width = max(10, *(len(n) for n in names))
    lines = [f"{'class':<{width}} {'precision':>9} {'recall':>7} {'F1':>6} {'rows':>7}"]
    lines += [f"{n:<{width}} {p:>9.4f} {r:>7.4f} {f:>6.4f} {int(a):>7}"
              for n, p, r, f, a in zip(names, precision.tolist(), recall.tolist(), f1.tolist(), actual.tolist())]
    lines += ["", "confusion (rows: true class, columns: predicted)",
              f"{'':<{width}} " + " ".join(f"{n[:8]:>8}" for n in names)]
    lines += [f"{n:<{width}} " + " ".join(f"{c:>8}" for c in row) for n, row in zip(names, confusion.tolist())]
    return "\n".join(lines)


def plot_confusion(confusion, names, path):
    """confusion.png: the matrix as a picture, each cell's count written in (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 1.2 * len(names) + 1.5))
    ax.imshow(confusion.numpy(), cmap="Blues")
    ax.set(xticks=range(len(names)), yticks=range(len(names)), xticklabels=names, yticklabels=names,
           xlabel="predicted", ylabel="true")
    for (i, j), count in zip(itertools.product(range(len(names)), repeat=2), confusion.flatten().tolist()):
        ax.text(j, i, count, ha="center", va="center")
    fig.tight_layout()
    write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=100), mode="wb")
    plt.close(fig)
    return path


# --- operations: not needed to follow the method --------------------------------------------------
# The command line, the device and precision, loading the base model, checkpoint files (ours and
# PEFT's), and the one-line error exit.

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help=".pkl (datasets.Dataset or pandas DataFrame), .csv, .jsonl or .parquet "
                                 "with a `text` column")
    p.add_argument("--checkpoint", default="checkpoint", help="folder written by train.py --out")
    p.add_argument("--out", default="submission.csv", help="CSV to write (ID,Label)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="auto: bf16 where the GPU or CPU runs it in hardware, else fp16 on CUDA, else fp32")
    p.error = fail  # one line, exit code 2
    args = p.parse_args(argv)
    if args.batch_size < 1:
        fail(f"--batch-size must be at least 1, got {args.batch_size}")
    return args


def pick_device():
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_precision(device, precision="auto"):
    """The autocast dtype for a precision name; None means plain fp32.

    auto: bf16 on GPUs that support it, else fp16 on CUDA; on a CPU, bf16 only where AMX runs bf16
    matrix products in hardware (elsewhere bf16 on a CPU is slower than fp32); fp32 on MPS.
    """
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif device.type == "cpu" and getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
            precision = "bf16"
        else:
            precision = "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def load_tokenizer(base_model):
    try:
        return AutoTokenizer.from_pretrained(base_model)
    except OSError as e:
        raise DataError(f"cannot load the tokenizer of {base_model} ({short(e, 120)}); give a hub name, or "
                        "offline a local model folder (--model DIR) with HF_HUB_OFFLINE=1") from None


def model_max_length(tokenizer):
    """The most tokens the model takes (its tokenizer knows; a huge value means "not set")."""
    return tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else 512


def load_base_model(base_model, num_labels):
    """The pretrained encoder (hub name or local folder) with a new, randomly initialised head."""
    transformers.logging.set_verbosity_error()  # its "head newly initialized" note: new on purpose
    transformers.logging.disable_progress_bar()
    try:
        # ignore_mismatched_sizes: a base model that already has a head of another size gets a new one
        return AutoModelForSequenceClassification.from_pretrained(base_model, num_labels=num_labels,
                                                                  ignore_mismatched_sizes=True)
    except OSError as e:
        raise DataError(f"cannot load the model {base_model} ({short(e, 120)}); give a hub name, or offline "
                        "a local model folder (--model DIR) with HF_HUB_OFFLINE=1") from None


def cast_frozen_linears(model, dtype):
    """Keep frozen nn.Linear layers in the autocast dtype, so autocast need not cast them each call.

    Autocast runs every Linear in `dtype` anyway: casting the frozen weights once gives the same
    numbers without copying them at every step. (This is why LoRALinear.merge casts its update to
    the base weight's dtype.)
    """
    if dtype is not None:
        for module in model.modules():
            if isinstance(module, nn.Linear) and not module.weight.requires_grad:
                module.to(dtype)
    return model


# PEFT's layout for the same adapter: its key = PEFT_PREFIX + our key, the head under modules_to_save
PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def read_checkpoint(checkpoint):
    """(config, tensors) from a train.py checkpoint folder, or from a PEFT LoRA adapter folder."""
    if os.path.isfile(os.path.join(checkpoint, PEFT_CONFIG_FILE)):
        return read_peft_adapter(checkpoint)
    config_path, adapter_path = (os.path.join(checkpoint, f) for f in (CONFIG_FILE, ADAPTER_FILE))
    if not (os.path.isfile(config_path) and os.path.isfile(adapter_path)):
        raise DataError(f"{checkpoint}: not a checkpoint folder (needs {CONFIG_FILE} and {ADAPTER_FILE}, or a "
                        f"PEFT {PEFT_CONFIG_FILE}); pass the --out folder of a finished train.py run")
    try:
        with open(config_path) as f:
            config = json.load(f)
        missing = {"base_model", "labels", "r", "alpha", "targets", "max_length"} - set(config)
        if missing:
            raise KeyError(", ".join(sorted(missing)))
        return config, load_file(adapter_path)
    except Exception as e:  # truncated, garbled or hand-edited files
        raise DataError(f"{checkpoint}: corrupt checkpoint ({type(e).__name__}: {e}); "
                        "retrain, or pick another checkpoint folder") from None


def export_peft(checkpoint, folder):
    """Write a train.py checkpoint as a PEFT adapter: `PeftModel.from_pretrained(base, folder)` loads it."""
    config, tensors = read_checkpoint(checkpoint)
    os.makedirs(folder, exist_ok=True)
    peft_config = {"peft_type": "LORA", "task_type": "SEQ_CLS", "base_model_name_or_path": config["base_model"],
                   "r": config["r"], "lora_alpha": config["alpha"], "lora_dropout": config.get("dropout", 0.0),
                   "target_modules": config["targets"], "bias": "none",
                   "modules_to_save": ["score" if any(k.startswith("score.") for k in tensors) else "classifier"],
                   "fan_in_fan_out": False, "inference_mode": True}
    peft_tensors = {PEFT_PREFIX + name: t for name, t in tensors.items()}
    save_tensors(os.path.join(folder, PEFT_WEIGHTS_FILE), peft_tensors)
    write_atomically(os.path.join(folder, PEFT_CONFIG_FILE), lambda f: json.dump(peft_config, f, indent=2))


def read_peft_adapter(folder):
    """(config, tensors) in our layout from a PEFT LoRA adapter folder (plain LoRA on Linear layers)."""
    try:
        with open(os.path.join(folder, PEFT_CONFIG_FILE)) as f:
            peft_config = json.load(f)
        weights = load_file(os.path.join(folder, PEFT_WEIGHTS_FILE))
    except Exception as e:
        raise DataError(f"{folder}: unreadable PEFT adapter ({type(e).__name__}: {e})") from None
    unsupported = [k for k in ("use_dora", "use_rslora", "fan_in_fan_out", "alpha_pattern", "rank_pattern")
                   if peft_config.get(k)]
    if peft_config.get("peft_type") != "LORA":
        unsupported.append(f"peft_type {peft_config.get('peft_type')}")
    if peft_config.get("bias", "none") != "none":
        unsupported.append("bias")
    if not isinstance(peft_config.get("target_modules"), list):
        unsupported.append("target_modules as a pattern")
    # strip PEFT's prefix, and the adapter name PEFT keeps in a head saved under modules_to_save
    tensors = {k.removeprefix(PEFT_PREFIX).replace(".modules_to_save.default.", "."): t for k, t in weights.items()}
    # the head's last layer maps to the labels and is its narrowest (RoBERTa's dense layer is hidden-wide)
    head_widths = [t.shape[0] for k, t in tensors.items() if k.startswith(("classifier.", "score.")) and t.dim() == 2]
    if not head_widths:
        unsupported.append("no trained classifier head")
    if unsupported:
        raise DataError(f"{folder}: only plain LoRA adapters with a classifier head load here; this one has "
                        f"{', '.join(unsupported)}")
    config = {"base_model": peft_config["base_model_name_or_path"], "r": peft_config["r"],
              "alpha": peft_config["lora_alpha"], "targets": sorted(peft_config["target_modules"]),
              "labels": [str(i) for i in range(min(head_widths))], "max_length": 512}
    return config, tensors


def save_tensors(path, tensors, metadata=None):
    """Tensors to a safetensors file, atomically (CPU copies, so training can go on meanwhile)."""
    cpu = {n: t.detach().to("cpu", copy=True).contiguous() for n, t in tensors.items()}
    write_atomically(path, lambda f: f.write(safetensors_bytes(cpu, metadata)), mode="wb")


def fail(message, code=2):
    """Bad input ends here: one line that says what is wrong and how to fix it, and a non-zero exit."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)



if __name__ == "__main__":
    main()
