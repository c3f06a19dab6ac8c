"""A checkpoint holds everything that is not the pretrained base's: a model is the base plus it.

    model, new = load_base_model("roberta-base", num_labels=4)   # pretrained, fp32, a new head
    ... inject_lora(model, ...), train ...
    save_checkpoint("checkpoint", checkpoint_tensors(model, new), config)
    model, tokenizer, config = load_model("checkpoint")         # base + checkpoint, adapters merged

What "not the base's" means, tensor by tensor (`checkpoint_tensors`):
- every LoRA adapter (saved as plain LoRA: see lora.LoRALinear.saved_A_B);
- every tensor transformers reports as newly initialized when it loads the base for this task
  (the classification head, usually), whether or not it was trained: frozen, it is still random;
- every other tensor that trains (a base that already has a matching head reports nothing new).
`load_model` rebuilds the base and refuses, in one line, a checkpoint that lacks an adapter or a new
tensor, or holds one that does not fit the model (which tensors trained is the run's own business:
whatever the checkpoint holds is loaded).
A checkpoint is a folder: `adapter.safetensors` (those tensors) and `config.json` (how to rebuild).
PEFT's layout is read and written too (`export_peft`, `read_peft_adapter`).
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


def load_base_model(base_model, num_labels):
    """(model, new): the pretrained encoder in fp32 with a head for `num_labels`, and the names of the
    tensors transformers made new for the task (a checkpoint must hold them: they are not the base's)."""
    transformers.logging.set_verbosity_error()  # its "newly initialized" report: new on purpose, and listed here
    transformers.logging.disable_progress_bar()
    try:
        # ignore_mismatched_sizes: a base model that already has a head of another size gets a new one
        model, info = AutoModelForSequenceClassification.from_pretrained(
            base_model, num_labels=num_labels, ignore_mismatched_sizes=True, output_loading_info=True)
    except OSError as e:
        raise DataError(f"cannot load the model {base_model} ({short(e, 120)}); give a hub name, or offline "
                        "a local model folder (--model DIR) with HF_HUB_OFFLINE=1") from None
    new = set(info["missing_keys"]) | {k[0] if isinstance(k, tuple) else k for k in info["mismatched_keys"]}
    return model.float(), sorted(new)  # fp32 whatever the folder holds: adapters and AdamW's state in fp32


def head_of(model):
    """The task head (`classifier`, or `score`): trained in full along with the adapters."""
    for name in ("classifier", "score"):
        if isinstance(getattr(model, name, None), nn.Module):
            return getattr(model, name)
    raise DataError(f"{type(model).__name__} has no `classifier` or `score` head to train")


def made_for_the_task(model, new):
    """Paths of the modules LoRA never adapts: the head (it trains whole) and any module holding a new tensor."""
    head = head_of(model)
    name = next(n for n, m in model.named_modules() if m is head)
    return {n.rpartition(".")[0] for n in new} | {f"{name}.{n}".rstrip(".") for n, _ in head.named_modules()}


def checkpoint_tensors(model, new):
    """{name: tensor} of everything not the pretrained base's: adapters (as plain LoRA), new tensors, trained ones."""
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = module.saved_A_B()
    state = model.state_dict()  # new tensors may be buffers too
    tensors.update({name: state[name] for name in new if name in state})
    tensors.update({name: p for name, p in model.named_parameters() if p.requires_grad and ".lora_" not in name})
    return {name: t.detach() for name, t in tensors.items()}


def save_checkpoint(folder, tensors, config):
    """adapter.safetensors (tensors) and then config.json into `folder`, each written atomically."""
    os.makedirs(folder, exist_ok=True)
    save_tensors(os.path.join(folder, ADAPTER_FILE), tensors)
    write_atomically(os.path.join(folder, CONFIG_FILE), lambda f: json.dump(config, f, indent=2))


def load_model(checkpoint, device="cpu", merge=True):
    """(model, tokenizer, config) from a checkpoint folder written by train.py (or a PEFT adapter).

    The base model is rebuilt as in training (pretrained encoder, new head, LoRA on the same
    layers) and the checkpoint's tensors are loaded on top. With merge=True each adapter is folded
    into its weight, W0 + (alpha/r) B A: inference then costs exactly what the base model costs.
    """
    config, tensors = read_checkpoint(checkpoint)
    base_model, labels, r, alpha, targets = (config[k] for k in ("base_model", "labels", "r", "alpha", "targets"))
    tokenizer = load_tokenizer(base_model)
    model, new = load_base_model(base_model, len(labels))
    try:
        inject_lora(model, r, alpha, targets=targets, skip=made_for_the_task(model, new))
    except ValueError as e:  # targets this base does not have
        raise DataError(f"{checkpoint}: does not fit {base_model} ({e}); pick the checkpoint that goes with it") from None
    expected = {n: t.shape for n, t in model.state_dict().items()}
    needed = {n for n in expected if ".lora_" in n or n in new}
    lacking, foreign = sorted(needed - set(tensors)), sorted(n for n, t in tensors.items() if expected.get(n) != t.shape)
    if lacking or foreign:
        raise DataError(f"{checkpoint}: its tensors do not fit {base_model} with r={r}, {len(labels)} labels: "
                        + (f"it lacks {printable(lacking[0], 80)}" if lacking else f"{printable(foreign[0], 80)} does not fit")
                        + (f" and {len(lacking) + len(foreign) - 1} more" if len(lacking) + len(foreign) > 1 else "")
                        + "; retrain, or pick the checkpoint that goes with it")
    model.load_state_dict(tensors, strict=False)
    if merge:
        merge_lora(model)
    model.requires_grad_(False)  # nothing trains from here on
    return model.to(device).eval(), tokenizer, config


def load_tokenizer(base_model):
    try:
        return AutoTokenizer.from_pretrained(base_model)
    except OSError as e:
        raise DataError(f"cannot load the tokenizer of {base_model} ({short(e, 120)}); give a hub name, or "
                        "offline a local model folder (--model DIR) with HF_HUB_OFFLINE=1") from None


def model_max_length(tokenizer):
    """The most tokens the model takes (its tokenizer knows; a huge value means "not set")."""
    return tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else 512


# --- files: ours and PEFT's ------------------------------------------------------------------------

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


def save_tensors(path, tensors, metadata=None):
    """Tensors to a safetensors file, atomically (CPU copies, so training can go on meanwhile)."""
    cpu = {n: t.detach().to("cpu", copy=True).contiguous() for n, t in tensors.items()}
    write_atomically(path, lambda f: f.write(safetensors_bytes(cpu, metadata)), mode="wb")


# PEFT's layout for the same adapter: its key = PEFT_PREFIX + our key, whole modules under modules_to_save
PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def export_peft(checkpoint, folder):
    """Write a train.py checkpoint as a PEFT adapter: `PeftModel.from_pretrained(base, folder)` loads it.

    target_modules lists the exact paths adapted (PEFT matches them by suffix, as --targets does);
    modules_to_save, the modules saved whole: the head (PEFT's own name for it), and any other module trained.
    """
    config, tensors = read_checkpoint(checkpoint)
    whole = sorted({n.split(".")[0] if n.split(".")[0] in ("classifier", "score") else n.rpartition(".")[0]
                    for n in tensors if ".lora_" not in n})
    peft_config = {"peft_type": "LORA", "task_type": "SEQ_CLS", "base_model_name_or_path": config["base_model"],
                   "r": config["r"], "lora_alpha": config["alpha"], "lora_dropout": config.get("dropout", 0.0),
                   "target_modules": config["targets"], "bias": "none", "modules_to_save": whole,
                   "fan_in_fan_out": False, "inference_mode": True}
    os.makedirs(folder, exist_ok=True)
    save_tensors(os.path.join(folder, PEFT_WEIGHTS_FILE), {PEFT_PREFIX + name: t for name, t in tensors.items()})
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
    # strip PEFT's prefix, and the adapter name PEFT keeps in a module saved under modules_to_save
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
