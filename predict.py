"""How we answer: rebuild the base model, load the trained adapter, merge it, label every text.

    python predict.py test.pkl [--checkpoint checkpoint] [--out submission.csv] [--batch-size 64]

Writes `ID,Label` rows, IDs 0..N-1 in input order. If the input has a `label` column too, prints
the accuracy. `load_model(checkpoint)` is the one way to get a trained model back.
"""
import argparse
import csv
import json
import numbers
import os
import sys

import torch
import transformers
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from data import DataError, pad_batch, read_texts, sorted_batches, tokenize
from lora import inject_lora, merge_lora

ADAPTER_FILE, CONFIG_FILE = "adapter.safetensors", "config.json"


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


def write_atomically(path, write, mode="w"):
    """Call write(file) on a temporary file beside `path`, then rename it into place.

    A crash mid-write leaves the old file (or none), never half a file.
    """
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode, **({"newline": ""} if mode == "w" else {})) as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def fail(message, code=2):
    """Bad input ends here: one line that says what is wrong and how to fix it, and a non-zero exit."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def load_tokenizer(base_model):
    try:
        return AutoTokenizer.from_pretrained(base_model)
    except OSError as e:
        raise DataError(f"cannot load the tokenizer of {base_model} ({str(e).splitlines()[0]}); give a hub "
                        "name or a local model folder") from None


def model_max_length(tokenizer):
    """The most tokens the model takes (its tokenizer knows; a huge value means "not set")."""
    return tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else 512


def build_model(base_model, num_labels, r, alpha, dropout=0.0, targets=("query", "value")):
    """The pretrained encoder with a new classification head and LoRA on the target layers."""
    transformers.logging.set_verbosity_error()  # its "head newly initialized" note: new on purpose
    transformers.logging.disable_progress_bar()
    try:
        # ignore_mismatched_sizes: a base model that already has a head of another size gets a new one
        model = AutoModelForSequenceClassification.from_pretrained(base_model, num_labels=num_labels,
                                                                   ignore_mismatched_sizes=True)
        return inject_lora(model, r, alpha, dropout, targets)
    except OSError as e:
        raise DataError(f"cannot load the model {base_model} ({str(e).splitlines()[0]}); give a hub name "
                        "or a local model folder") from None
    except ValueError as e:  # an unknown --targets name: the message lists the ones that exist
        raise DataError(str(e)) from None


def cast_frozen_linears(model, dtype):
    """Keep frozen nn.Linear layers in the autocast dtype, so autocast need not cast them each call.

    Autocast runs every Linear in `dtype` anyway: casting the frozen weights once gives the same
    numbers without copying them at every step.
    """
    if dtype is not None:
        for module in model.modules():
            if isinstance(module, nn.Linear) and not module.weight.requires_grad:
                module.to(dtype)
    return model


def load_model(checkpoint, device="cpu", merge=True, dtype=None):
    """(model, tokenizer, config) from a checkpoint folder written by train.py, in eval mode.

    With merge=True the adapters are folded into the base weights: inference then costs exactly
    what the base model costs. With a dtype (the autocast dtype), the Linear layers are stored in it.
    """
    config_path, adapter_path = (os.path.join(checkpoint, f) for f in (CONFIG_FILE, ADAPTER_FILE))
    if not (os.path.isfile(config_path) and os.path.isfile(adapter_path)):
        raise DataError(f"{checkpoint}: not a checkpoint folder (needs {CONFIG_FILE} and {ADAPTER_FILE}); "
                        "pass the --out folder of a finished train.py run")
    try:
        with open(config_path) as f:
            config = json.load(f)
        base_model, labels, r, alpha, targets = (config[k] for k in ("base_model", "labels", "r", "alpha", "targets"))
        trained = load_file(adapter_path)
    except Exception as e:  # truncated, garbled or hand-edited files
        raise DataError(f"{checkpoint}: corrupt checkpoint ({type(e).__name__}: {e}); "
                        "retrain, or pick another checkpoint folder") from None
    tokenizer = load_tokenizer(base_model)
    model = build_model(base_model, len(labels), r, alpha, targets=targets)
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    try:
        if set(trained) != expected:
            raise RuntimeError("other tensor names")
        model.load_state_dict(trained, strict=False)
    except RuntimeError:  # other names (targets) or shapes (r, label count) than config.json says
        raise DataError(f"{checkpoint}: its tensors do not fit {base_model} with r={r}, targets={targets}, "
                        f"{len(labels)} labels; retrain, or pick the checkpoint that goes with it") from None
    if merge:
        merge_lora(model)
    model.requires_grad_(False)  # nothing trains from here on
    return cast_frozen_linears(model.to(device), dtype).eval(), tokenizer, config


@torch.inference_mode()
def predict_logits(model, token_ids, pad_id, batch_size, device, amp_dtype=None):
    """Logits (N, num_labels) for every token-id list, in input order.

    Batches are sorted by length so each one pads little; results go back to their input rows.
    """
    model.eval()
    logits = torch.empty(len(token_ids), model.config.num_labels, device=device)
    for rows in sorted_batches([len(ids) for ids in token_ids], batch_size):
        input_ids, attention_mask = pad_batch([token_ids[i] for i in rows], pad_id)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        logits[torch.tensor(rows, device=device)] = out.float()
    return logits.cpu()


def main(argv=None):
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
    try:
        texts, labels = read_texts(args.input)
        device = pick_device()
        amp_dtype = pick_precision(device, args.precision)
        model, tokenizer, config = load_model(args.checkpoint, device, dtype=amp_dtype)
    except DataError as e:
        fail(str(e))
    token_ids = tokenize(tokenizer, texts, config["max_length"])
    predictions = predict_logits(model, token_ids, tokenizer.pad_token_id, args.batch_size, device,
                                 amp_dtype).argmax(-1).tolist()

    def write(f):
        out = csv.writer(f)
        out.writerow(["ID", "Label"])
        out.writerows(enumerate(predictions))
    write_atomically(args.out, write)
    print(f"wrote {len(predictions)} predictions to {args.out}")
    if labels is not None and all(isinstance(y, numbers.Integral) for y in labels):
        correct = sum(int(p == y) for p, y in zip(predictions, labels))
        print(f"accuracy {correct / len(labels):.4f} ({correct}/{len(labels)})")


if __name__ == "__main__":
    main()
