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
from safetensors.torch import load_file, save as safetensors_bytes
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from data import DataError, pad_batch, read_texts, short, sorted_batches, tokenize
from lora import inject_lora, merge_lora

ADAPTER_FILE, CONFIG_FILE = "adapter.safetensors", "config.json"
# PEFT's layout for the same adapter: its key = PEFT_PREFIX + our key, the head under modules_to_save
PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


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


def save_tensors(path, tensors, metadata=None):
    """Tensors to a safetensors file, atomically (CPU copies, so training can go on meanwhile)."""
    cpu = {n: t.detach().to("cpu", copy=True).contiguous() for n, t in tensors.items()}
    write_atomically(path, lambda f: f.write(safetensors_bytes(cpu, metadata)), mode="wb")


def fail(message, code=2):
    """Bad input ends here: one line that says what is wrong and how to fix it, and a non-zero exit."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def load_tokenizer(base_model):
    try:
        return AutoTokenizer.from_pretrained(base_model)
    except OSError as e:
        raise DataError(f"cannot load the tokenizer of {base_model} ({short(e, 120)}); give a hub name, or "
                        "offline a local model folder (--model DIR) with HF_HUB_OFFLINE=1") from None


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
        raise DataError(f"cannot load the model {base_model} ({short(e, 120)}); give a hub name, or offline "
                        "a local model folder (--model DIR) with HF_HUB_OFFLINE=1") from None
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
                   "target_modules": config["targets"], "modules_to_save": ["classifier"], "bias": "none",
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


def load_model(checkpoint, device="cpu", merge=True, dtype=None):
    """(model, tokenizer, config) from a checkpoint folder written by train.py (or a PEFT adapter).

    With merge=True the adapters are folded into the base weights: inference then costs exactly
    what the base model costs. With a dtype (the autocast dtype), the Linear layers are stored in it.
    """
    config, trained = read_checkpoint(checkpoint)
    base_model, labels, r, alpha, targets = (config[k] for k in ("base_model", "labels", "r", "alpha", "targets"))
    tokenizer = load_tokenizer(base_model)
    model = build_model(base_model, len(labels), r, alpha, targets=targets)
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
    token_ids = tokenize(tokenizer, texts, min(config["max_length"], model_max_length(tokenizer)))
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
