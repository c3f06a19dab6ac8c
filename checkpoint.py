"""A checkpoint holds everything that is not the pretrained base's: a model is the base plus it.

    model, tokenizer, new = load_base_model("roberta-base", num_labels=4)   # a new head
    ... inject_lora(model, ..., skip=new), train ...
    save_checkpoint("checkpoint", checkpoint_tensors(model, new), config)
    model, tokenizer, config = load_model("checkpoint")    # the base + the checkpoint, merged

What "not the base's" means (`checkpoint_tensors`): every LoRA adapter (as plain LoRA: see
lora.LoRALinear.saved_A_B); the whole state of every module made for the task (`new`: the head,
whatever `head_of` finds, trained or frozen, and any module holding a tensor transformers reports
as newly initialized); and every other tensor that trains. `load_model` rebuilds the base and
refuses, in one line, a checkpoint that lacks one of those or holds one that does not fit.
A checkpoint is a folder: `adapter.safetensors` (the tensors) and `config.json` (how to rebuild).
"""
import json
import os

import transformers
from safetensors.torch import load_file, save as safetensors_bytes
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from data import DataError, printable, short, write_atomically
from lora import LoRALinear, inject_lora, merge_lora

ADAPTER_FILE, CONFIG_FILE = "adapter.safetensors", "config.json"


def load_base_model(base_model, num_labels, max_length=None):
    """(model, tokenizer, new): the pretrained encoder in fp32 with a head for `num_labels`, its
    tokenizer, and `new`, the paths of the modules made for the task (the head first)."""
    transformers.logging.set_verbosity_error()  # "newly initialized": on purpose, listed in `new`
    transformers.logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_model)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            base_model, num_labels=num_labels, output_loading_info=True,
            ignore_mismatched_sizes=True)  # a head of another size is replaced by a new one
    except (OSError, ValueError) as e:
        raise DataError(f"cannot load the model {base_model} ({short(e, 120)}); give a hub name, "
                        "or offline a local model folder (--model DIR) with HF_HUB_OFFLINE=1") \
            from None
    limit = tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else 512
    if max_length is not None and max_length > limit:
        raise DataError(f"--max-length {max_length} is above {base_model}'s limit of {limit} "
                        f"tokens; use --max-length {limit} or less")
    missing = list(info["missing_keys"]) + [k[0] if isinstance(k, tuple) else k
                                      for k in info["mismatched_keys"]]
    head = next(n for n, m in model.named_modules() if m is head_of(model))
    new = [head] + sorted({n.rpartition(".")[0] for n in missing if not n.startswith(head + ".")})
    return model.float(), tokenizer, new  # fp32: adapters and AdamW's state train in fp32


def head_of(model):
    """The task head (`classifier`, or `score`): trained in full along with the adapters."""
    for name in ("classifier", "score"):
        if isinstance(getattr(model, name, None), nn.Module):
            return getattr(model, name)
    raise DataError(f"{type(model).__name__} has no `classifier` or `score` head to train")


def checkpoint_tensors(model, new):
    """{name: tensor}: the adapters (as plain LoRA), the whole state of each module in `new`,
    and every other tensor that trains."""
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            A, B = module.saved_A_B()
            tensors[f"{name}.lora_A.weight"] = A
            tensors[f"{name}.lora_B.weight"] = B
    for name, t in model.state_dict().items():  # buffers too
        if any(name.startswith(path + ".") for path in new):
            tensors[name] = t
    for name, p in model.named_parameters():
        if p.requires_grad and ".lora_" not in name:
            tensors[name] = p
    return {name: t.detach() for name, t in tensors.items()}


def save_checkpoint(folder, tensors, config):
    """adapter.safetensors (tensors), then config.json, into `folder`, each written atomically."""
    os.makedirs(folder, exist_ok=True)
    save_tensors(os.path.join(folder, ADAPTER_FILE), tensors)
    write_atomically(os.path.join(folder, CONFIG_FILE), lambda f: json.dump(config, f, indent=2))


def load_model(checkpoint, device="cpu"):
    """(model, tokenizer, config) from a checkpoint folder of train.py's (or a PEFT adapter).

    The base is rebuilt as in training (the pretrained encoder, a new head, LoRA on the same
    layers), the checkpoint's tensors are loaded on top, and each adapter is folded into its
    weight, W0 + (alpha/r) B A: inference then costs exactly what the base model costs.
    """
    config, tensors = read_checkpoint(checkpoint)
    model, tokenizer, new = load_base_model(config["base_model"], len(config["labels"]))
    try:
        inject_lora(model, config["r"], config["alpha"], targets=config["targets"], skip=new)
    except ValueError as e:  # targets this base does not have
        raise DataError(f"{checkpoint}: does not fit {config['base_model']} ({e}); pick the "
                        "checkpoint that goes with it") from None
    check_fits(checkpoint, config, tensors, model.state_dict(), new)
    model.load_state_dict(tensors, strict=False)
    merge_lora(model)
    return model.requires_grad_(False).to(device).eval(), tokenizer, config


# --- files: ours and PEFT's ------------------------------------------------------------------------

def check_fits(checkpoint, config, tensors, state, new):
    """One line if the checkpoint lacks an adapter or a new module's tensor, or holds a tensor
    that is not the model's or not of its shape."""
    needed = {n for n in state if ".lora_" in n or any(n.startswith(p + ".") for p in new)}
    lacking = sorted(needed - set(tensors))
    foreign = sorted(n for n, t in tensors.items() if n not in state or state[n].shape != t.shape)
    if lacking or foreign:
        what = f"it lacks {printable(lacking[0], 80)}" if lacking else \
            f"{printable(foreign[0], 80)} does not fit"
        more = len(lacking) + len(foreign) - 1
        raise DataError(f"{checkpoint}: its tensors do not fit {config['base_model']} with "
                        f"r={config['r']}, {len(config['labels'])} labels: {what}"
                        + (f" and {more} more" if more else "")
                        + "; retrain, or pick the checkpoint that goes with it")


def read_checkpoint(checkpoint):
    """(config, tensors) from a train.py checkpoint folder, or from a PEFT LoRA adapter folder."""
    if os.path.isfile(os.path.join(checkpoint, PEFT_CONFIG_FILE)):
        return read_peft_adapter(checkpoint)
    config_path = os.path.join(checkpoint, CONFIG_FILE)
    adapter_path = os.path.join(checkpoint, ADAPTER_FILE)
    if not (os.path.isfile(config_path) and os.path.isfile(adapter_path)):
        raise DataError(f"{checkpoint}: not a checkpoint folder (needs {CONFIG_FILE} and "
                        f"{ADAPTER_FILE}, or a PEFT {PEFT_CONFIG_FILE}); pass the --out folder "
                        "of a finished train.py run")
    try:
        with open(config_path) as f:
            config = json.load(f)
        missing = {"base_model", "labels", "r", "alpha", "targets", "max_length"} - set(config)
        if missing:
            raise KeyError(", ".join(sorted(missing)))
        return config, load_file(adapter_path)
    except Exception as e:  # truncated, garbled or hand-edited files
        raise DataError(f"{checkpoint}: corrupt checkpoint ({type(e).__name__}: {short(e, 200)}); "
                        "retrain, or pick another checkpoint folder") from None


def save_tensors(path, tensors, metadata=None):
    """Tensors to a safetensors file, atomically (CPU copies, so training can go on meanwhile)."""
    cpu = {n: t.detach().to("cpu", copy=True).contiguous() for n, t in tensors.items()}
    write_atomically(path, lambda f: f.write(safetensors_bytes(cpu, metadata)), mode="wb")


# PEFT's layout of the same adapter: its key = PEFT_PREFIX + ours, modules saved whole under
# modules_to_save
PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def export_peft(checkpoint, folder):
    """Write a train.py checkpoint as a PEFT adapter: `PeftModel.from_pretrained(base, folder)`.

    target_modules lists the exact paths adapted (PEFT matches them by suffix, as --targets does);
    modules_to_save, the modules saved whole: the head (PEFT's name for it), and any other.
    """
    config, tensors = read_checkpoint(checkpoint)
    whole = sorted({n.split(".")[0] if n.split(".")[0] in ("classifier", "score")
                    else n.rpartition(".")[0] for n in tensors if ".lora_" not in n})
    peft_config = {"peft_type": "LORA", "task_type": "SEQ_CLS",
                   "base_model_name_or_path": config["base_model"], "r": config["r"],
                   "lora_alpha": config["alpha"], "lora_dropout": config.get("dropout", 0.0),
                   "target_modules": config["targets"], "bias": "none", "modules_to_save": whole,
                   "fan_in_fan_out": False, "inference_mode": True}
    os.makedirs(folder, exist_ok=True)
    peft_tensors = {PEFT_PREFIX + name: t for name, t in tensors.items()}
    save_tensors(os.path.join(folder, PEFT_WEIGHTS_FILE), peft_tensors)
    write_atomically(os.path.join(folder, PEFT_CONFIG_FILE),
                     lambda f: json.dump(peft_config, f, indent=2))


def read_peft_adapter(folder):
    """(config, tensors) in our layout from a PEFT LoRA adapter folder (plain LoRA on Linears)."""
    try:
        with open(os.path.join(folder, PEFT_CONFIG_FILE)) as f:
            peft_config = json.load(f)
        weights = load_file(os.path.join(folder, PEFT_WEIGHTS_FILE))
    except Exception as e:
        raise DataError(f"{folder}: unreadable PEFT adapter ({type(e).__name__}: {short(e, 200)})") \
            from None
    unsupported = [k for k in ("use_dora", "use_rslora", "fan_in_fan_out", "alpha_pattern",
                               "rank_pattern") if peft_config.get(k)]
    if peft_config.get("peft_type") != "LORA":
        unsupported.append(f"peft_type {short(peft_config.get('peft_type'))}")
    if peft_config.get("bias", "none") != "none":
        unsupported.append("bias")
    if not isinstance(peft_config.get("target_modules"), list):
        unsupported.append("target_modules as a pattern")
    # strip PEFT's prefix, and the adapter name PEFT keeps in a module under modules_to_save
    tensors = {k.removeprefix(PEFT_PREFIX).replace(".modules_to_save.default.", "."): t
               for k, t in weights.items()}
    # the head's last layer maps to the labels and is its narrowest (RoBERTa's dense is wide)
    head_widths = [t.shape[0] for k, t in tensors.items()
                   if k.startswith(("classifier.", "score.")) and t.dim() == 2]
    if not head_widths:
        unsupported.append("no trained classifier head")
    if unsupported:
        raise DataError(f"{folder}: only plain LoRA adapters with a classifier head load here; "
                        f"this one has {', '.join(unsupported)}")
    config = {"base_model": peft_config["base_model_name_or_path"], "r": peft_config["r"],
              "alpha": peft_config["lora_alpha"], "targets": sorted(peft_config["target_modules"]),
              "labels": [str(i) for i in range(min(head_widths))], "max_length": 512}
    return config, tensors
