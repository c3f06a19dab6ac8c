"""A checkpoint holds everything that is not the pretrained base's: a model is the base plus it.

    model, tokenizer, task_paths = load_base_model("roberta-base", num_labels=4)   # a new head
    ... inject_lora(model, ..., skip=task_paths), train ...
    save_checkpoint("checkpoint", model, task_paths, config)
    model, tokenizer, config = load_model("checkpoint")    # the base + the checkpoint

What "not the base's" means (`checkpoint_tensors`): every LoRA adapter (as plain LoRA: a PiSSA
adapter as lora.PiSSALinear.as_plain_lora gives it); the whole state of every module made for the
task (`task_paths`: the head, whatever `head_of` finds, trained or frozen, and any module holding
a tensor transformers reports as newly initialized); and every other tensor that trains.
`load_model` rebuilds the base and refuses, in one line, a checkpoint that lacks one of those or
holds one that does not fit. A checkpoint is a folder: `adapter.safetensors` (the tensors) and
`config.json` (how to rebuild).
"""
import json
import math
import os
import shutil
import socket
import sys
import tempfile
import threading
import urllib.parse
import urllib.request

import torch
import transformers
from safetensors.torch import load_file, save as safetensors_bytes
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from data import MAX_CLASSES, NAME_CHARS, InputError, label_value, printable, short
from data import write_atomically
from lora import PiSSALinear, inject_lora, merge_lora, target_paths

ADAPTER_FILE, CONFIG_FILE = "adapter.safetensors", "config.json"
PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
CHECKPOINT_FILES = {ADAPTER_FILE, CONFIG_FILE, PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE}  # ours, PEFT's


def load_base_model(base_model, num_labels, max_length=None):
    """(model, tokenizer, task_paths): the pretrained model in fp32, its head for `num_labels` new
    unless it held one of that size; task_paths: the modules trained in full, the head first."""
    tokenizer, model, initialized = pretrained(base_model, num_labels, max_length)
    head = next(path for path, module in model.named_modules() if module is head_of(model))
    others = {name.rpartition(".")[0] for name in initialized if not name.startswith(head + ".")}
    return model.float(), tokenizer, [head, *sorted(others)]  # fp32: what trains, trains in fp32


def head_of(model):
    """The task head (`classifier`, or `score`): trained in full along with the adapters."""
    for name in ("classifier", "score"):
        if isinstance(getattr(model, name, None), nn.Module):
            return getattr(model, name)
    raise InputError(f"{type(model).__name__} has no `classifier` or `score` head to train")


def checkpoint_tensors(model, task_paths):
    """{name: tensor}: the adapters (as plain LoRA), the whole state of each module made for the
    task, and every other tensor that trains."""
    tensors = {n: t for n, t in model.state_dict().items()  # buffers too
               if any(n.startswith(path + ".") for path in task_paths)}
    tensors.update({n: p for n, p in model.named_parameters() if p.requires_grad})
    for name, module in model.named_modules():
        if isinstance(module, PiSSALinear):  # saved as plain LoRA of rank 2r
            tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = \
                module.as_plain_lora()
    return {name: t.detach() for name, t in tensors.items()}


def save_checkpoint(folder, model, task_paths, config):
    """adapter.safetensors (checkpoint_tensors) and config.json (as_saved) into `folder`, each
    written atomically."""
    os.makedirs(folder, exist_ok=True)
    save_tensors(os.path.join(folder, ADAPTER_FILE), checkpoint_tensors(model, task_paths))
    write_atomically(os.path.join(folder, CONFIG_FILE),
                     lambda f: json.dump(as_saved(config), f, indent=2))


def as_saved(config):
    """The config as saved: a PiSSA adapter is saved as plain LoRA of rank 2r and alpha 2 alpha
    (the same alpha / r); `trained_r` keeps the rank it trained at."""
    config = {**config, "trained_r": config["r"]}
    if config["init"] == "pissa":
        config.update(r=2 * config["r"], alpha=2 * config["alpha"])
    return config


def load_model(checkpoint, device="cpu"):
    """(model, tokenizer, config) of a checkpoint folder (ours or PEFT's): the base rebuilt as in
    training, its tensors on top, adapters unmerged as in validation (PiSSA: up to rounding)."""
    config, tensors = read_checkpoint(checkpoint)
    model, tokenizer, task_paths = load_base_for(checkpoint, config, tensors)
    inject_lora(model, config["r"], config["alpha"], targets=config["targets"], skip=task_paths)
    check_fits(checkpoint, config, tensors, model.state_dict(), task_paths)
    model.load_state_dict(tensors, strict=False)
    return model.requires_grad_(False).to(device).eval(), tokenizer, config


# --- operations: reading and checking files, ours and PEFT's ------------------------------------

def pretrained(base_model, num_labels, max_length):
    """(tokenizer, model, names of the tensors it initialized anew) of a hub name or folder, or
    one line. SDPA attention where the model has it, its own where not; a tokenizer without a pad
    token pads with its end-of-text token (decoders: the `score` head reads the last token that is
    not padding). The folder (a hub name's, once downloaded) is checked first (check_base_folder),
    the model and tokenizer after (check_fit)."""
    transformers.logging.set_verbosity_error()  # "newly initialized": on purpose, in task_paths
    transformers.logging.disable_progress_bar()
    where = printable(base_model, 100)
    try:
        folder = base_model if os.path.isdir(base_model) else downloaded(base_model)
        config = check_base_folder(folder, num_labels)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            folder, config=config, output_loading_info=True,  # config: its attention set too
            ignore_mismatched_sizes=True)  # a head of another size is replaced by a new one
    except InputError:
        raise
    except Exception as e:  # a missing folder, a typo, no network, files that are not weights
        raise InputError(f"cannot load the model {where} ({type(e).__name__}: {short(e, 120)}); "
                         "give a hub name, or offline a local model folder (--model DIR) with "
                         "HF_HUB_OFFLINE=1") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # no new embedding row: nothing more to save
    model.config.pad_token_id = tokenizer.pad_token_id
    # mismatched keys come as (name, shape in the file, shape in the model)
    mismatched = [k[0] if isinstance(k, tuple) else k for k in info["mismatched_keys"]]
    check_fit(where, tokenizer, model, max_length, mismatched)
    return tokenizer, model, list(info["missing_keys"]) + mismatched


def downloaded(name):
    """The local folder of a hub model: its config, tokenizer and safetensors weights, downloaded
    (or found in the cache), so that the folder is checked before anything is built from it. No
    pickled weights: a repository without safetensors is refused."""
    import huggingface_hub
    return huggingface_hub.snapshot_download(name, allow_patterns=[
        "*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "tokenizer*"])


def attention(config):
    """SDPA where the model's class has it, else its own ("eager"): never what config.json asks,
    which may name a kernel to fetch from the hub and import."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING
    model_class = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)]
    return "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"


MAX_LAYERS = 512  # a base's layers at most: each is Python objects, however small its weights
WEIGHT_NAMES = ("model.safetensors", "model-", "pytorch_model.bin", "pytorch_model-")


def check_base_folder(folder, num_labels):
    """The folder's config, once refused in one line if it names more than MAX_LAYERS layers, a
    number that is not one (NaN), or a model larger than the weight files transformers will read
    can hold (a byte a parameter at least: a 1 MB folder saying 64 layers of width 4096 would make
    transformers allocate 52 GB). The model is counted on the meta device: nothing is allocated."""
    where = printable(folder, 100)
    raw = read_json(os.path.join(folder, CONFIG_FILE))  # its size bounded, a regular file
    layers = [v for k, v in raw.items() if "layers" in k and is_int(v) and v > MAX_LAYERS]
    if layers or not all(is_number(v) for v in numbers_in(raw)):
        raise InputError(f"{where}: its config names {f'{layers[0]:,} layers' if layers else 'NaN'}"
                         f"; not a model to fine-tune here (at most {MAX_LAYERS} layers)")
    config = transformers.AutoConfig.from_pretrained(folder, num_labels=num_labels)
    config._attn_implementation = attention(config)  # before anything is built from the config
    with torch.device("meta"):
        described = AutoModelForSequenceClassification.from_config(config)
    needed = sum(p.numel() for p in described.parameters()) - \
        sum(p.numel() for p in head_of(described).parameters())
    files = [f for f in os.scandir(folder) if f.name.startswith(WEIGHT_NAMES) and f.is_file()]
    if any(f.name.endswith(".safetensors") for f in files):  # what transformers reads first
        files = [f for f in files if f.name.endswith(".safetensors")]
    held = sum(min(f.stat().st_size, f.stat().st_blocks * 512) for f in files)  # sparse: unheld
    if held < needed:
        raise InputError(f"{where}: its config describes a model of {needed:,} parameters, but its "
                         f"weight files hold {held:,} bytes; not a model folder (pick the base "
                         "model the checkpoint was trained on)")
    return config


def numbers_in(value, depth=0):
    """Every float in a JSON value, a few levels deep."""
    if isinstance(value, float):
        yield value
    elif depth < 4 and isinstance(value, (dict, list)):
        for item in value.values() if isinstance(value, dict) else value:
            yield from numbers_in(item, depth + 1)


def check_fit(where, tokenizer, model, max_length, mismatched):
    """One line unless the tokenizer, embeddings, positions and weights fit one another: every
    token id has an embedding row, --max-length fits the position table and the tokenizer's
    limit, there is a token to pad with, only the head's weights differ from the config, and the
    tokenizer's normalizers cannot make a text many times longer than it is."""
    rows = model.get_input_embeddings().num_embeddings
    largest = max(tokenizer.get_vocab().values(), default=0)
    if len(tokenizer) > rows or largest >= rows:
        raise InputError(f"{where}: its tokenizer has ids up to {largest:,}, its embedding table "
                         f"{rows:,} rows; the tokenizer is not this model's")
    if tokenizer.pad_token_id is None:
        raise InputError(f"{where}: its tokenizer has no pad token and no end-of-text token to pad "
                         "with; set one (tokenizer.pad_token) and save it")
    foreign = [k for k in mismatched if not k.startswith(("classifier", "score"))]
    if foreign:
        raise InputError(f"{where}: its weights do not fit its config ({printable(foreign[0], 60)} "
                         "has another shape); not a model folder")
    growth = normalizer_growth(tokenizer)
    if growth > 64:
        raise InputError(f"{where}: its tokenizer's normalizers can make a text {growth:,} times "
                         "longer or more; not a tokenizer to read texts with")
    limit = min(tokenizer.model_max_length, position_slots(model))
    tokenizer.model_max_length = limit = limit if limit < 1_000_000 else 512  # what predict cuts at
    if max_length is not None and max_length > limit:
        raise InputError(f"max length {max_length} is above {where}'s limit of {limit} tokens; "
                         f"use --max-length {limit} or less, or the base the checkpoint names")


def normalizer_growth(tokenizer):
    """How many times longer the normalizers can make a text, at most: each Replace multiplies a
    character by its replacement's length (22 Replaces of "w" by "ww" make one "w" 4 million)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    tree = json.loads(backend.to_str()).get("normalizer") if backend else None
    growth, stack = 1, [tree]
    while stack and growth <= 2**20:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("type") == "Replace":
                growth *= max(1, len(str(node.get("content", ""))))
            stack.extend(node.get("normalizers") or [])
    return growth


def position_slots(model):
    """How many positions the model's absolute position table holds (RoBERTa's first two are
    taken), or a huge number where positions are relative or rotary."""
    table = getattr(getattr(model.base_model, "embeddings", None), "position_embeddings", None)
    if not isinstance(table, nn.Embedding):
        return 10**9
    return table.num_embeddings - (0 if table.padding_idx is None else table.padding_idx + 1)


# A checkpoint may come from anyone: its files are checked before anything is built from them.
# config.json by type and range (bounded in size first), a safetensors header (bounded) before
# any tensor is read, the values after; a PEFT config's options that we do not implement refused.
CONFIG_BYTES, HEADER_BYTES = 2**20, 100 * 2**20  # a config, a safetensors header: at most
MAX_LABELS, MAX_TARGETS, MAX_R = MAX_CLASSES, 10_000, 4096
FLOAT_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}  # the dtypes a checkpoint may hold


def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v):  # a huge int is finite: math.isfinite would overflow on it
    return is_int(v) or (isinstance(v, float) and math.isfinite(v))


def is_strings(v, most):
    return isinstance(v, list) and 1 <= len(v) <= most and all(isinstance(s, str) for s in v)


def fit_names(names):  # each is the Label written for its class: bounded, writable, its own
    return len(set(map(label_value, names))) == len(names) and \
        all(len(n) <= NAME_CHARS and n.isprintable() for n in names)


# field: (whether a value is right, what it must be); the first six are required
CONFIG_RULES = {
    "base_model": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "labels": (lambda v: is_strings(v, MAX_LABELS) and fit_names(v),
               f"a list of 1 to {MAX_LABELS:,} strings, distinct (3 and 03 are one), each "
               f"printable and of {NAME_CHARS} characters at most"),
    "r": (lambda v: is_int(v) and 1 <= v <= MAX_R, f"an integer from 1 to {MAX_R}"),
    "alpha": (lambda v: is_number(v) and 0 < v <= 1e6, "a finite number above 0, at most 1e6"),
    "targets": (lambda v: is_strings(v, MAX_TARGETS), f"a list of 1 to {MAX_TARGETS:,} strings"),
    "max_length": (lambda v: is_int(v) and 2 <= v <= 1_000_000, "an integer from 2 to 1,000,000"),
    "dropout": (lambda v: is_number(v) and 0 <= v < 1, "a number from 0 up to (not) 1"),
    "init": (lambda v: v in ("lora", "pissa"), '"lora" or "pissa"'),
    "trained_r": (lambda v: is_int(v) and 1 <= v <= MAX_R, f"an integer from 1 to {MAX_R}"),
}
REQUIRED = list(CONFIG_RULES)[:6]


def check_config(config, where, names=None):
    """Refuse, in one line naming the field (`names`: how the file calls it), a config whose
    fields are missing or not of CONFIG_RULES' types and ranges. Returns config."""
    for field, (right, what) in CONFIG_RULES.items():
        shown = (names or {}).get(field, field)
        if field not in config:
            if field in REQUIRED:
                raise InputError(f"{where}: lacks `{shown}`, {what}; retrain, or fix that file")
        elif not right(config[field]):
            raise InputError(f"{where}: `{shown}` must be {what}, not {short(config[field], 40)}")
    return config


def read_json(path):
    """The JSON object in `path`, refused in one line if it is above CONFIG_BYTES, not JSON
    (an integer of over 4,300 digits, nesting too deep) or not an object."""
    where = printable(path, 100)
    try:
        if not os.path.isfile(path):  # a pipe would never end
            raise InputError(f"{where}: not a regular file; give the file itself")
        if os.path.getsize(path) > CONFIG_BYTES:
            raise InputError(f"{where}: above {CONFIG_BYTES // 2**20} MiB, too big for a config")
        with open(path, "rb") as f:
            value = json.loads(f.read(CONFIG_BYTES + 1))
    except RecursionError:
        raise InputError(f"{where}: not JSON (nested too deep)") from None
    except ValueError as e:  # a JSON syntax error, not UTF-8, or an int of over 4,300 digits
        if isinstance(e, InputError):
            raise
        why = "an integer of over 4,300 digits" if "digits" in str(e) else short(e, 80)
        raise InputError(f"{where}: not JSON ({why})") from None
    except OSError as e:
        raise InputError(f"{where}: cannot read it ({short(e, 80)})") from None
    if not isinstance(value, dict):
        raise InputError(f"{where}: holds {type(value).__name__}, not a JSON object {{...}}")
    return value


MAX_TENSORS = 10_000  # RoBERTa-base's every Linear adapted, and its head: under 200


def check_header(path):
    """{name: shape} from a safetensors file's header, read alone and bounded: 8 bytes of its
    length (little-endian), then JSON. Every tensor must be floating, its shape non-negative
    ints and its bytes, shape times dtype size, within the file; one line otherwise."""
    where = printable(path, 100)
    if not os.path.isfile(path):  # missing, a folder, a pipe
        raise InputError(f"{where}: not a file of tensors; retrain, or pick another checkpoint")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if size < 8 or length > min(HEADER_BYTES, size - 8):
            raise InputError(f"{where}: not a safetensors file (its header length {length:,} is "
                             f"above {HEADER_BYTES // 2**20} MiB or beyond the file)")
        try:
            header = json.loads(f.read(length))
        except (RecursionError, ValueError) as e:
            raise InputError(f"{where}: not a safetensors file (its header is not JSON: "
                             f"{short(e, 60)})") from None
    if not isinstance(header, dict):
        raise InputError(f"{where}: not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    if len(header) > MAX_TENSORS:
        raise InputError(f"{where}: {len(header):,} tensors, more than any adapter holds "
                         f"({MAX_TENSORS:,}); not a checkpoint")
    data_size, total, shapes = size - 8 - length, 0, {}
    for name, entry in header.items():
        entry = entry if isinstance(entry, dict) else {}
        dtype, shape, span = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in FLOAT_BYTES:
            raise InputError(f"{where}: tensor {printable(name, 60)} is {short(dtype, 20)}, not a "
                             "floating dtype (F16, BF16, F32, F64)")
        if not (isinstance(shape, list) and len(shape) <= 8
                and all(is_int(n) and n >= 0 for n in shape)):
            raise InputError(f"{where}: tensor {printable(name, 60)} has shape {short(shape, 40)}, "
                             "not a list of at most 8 non-negative integers")
        fits = isinstance(span, list) and len(span) == 2 and all(map(is_int, span)) and \
            0 <= span[0] <= span[1] <= data_size
        if not fits or math.prod(shape) * FLOAT_BYTES[dtype] != span[1] - span[0]:
            raise InputError(f"{where}: tensor {printable(name, 60)}'s data_offsets "
                             f"{short(span, 40)} are beyond the file or not its shape's size")
        total += span[1] - span[0]
        shapes[name] = shape
    if total > data_size:
        raise InputError(f"{where}: its tensors hold {total:,} bytes, more than the file's "
                         f"{data_size:,}; not a safetensors file")
    return shapes


def read_tensors(path):
    """{name: tensor} of a safetensors file whose header passes check_header, refused in one line
    if a value is not finite (NaN or inf would make every prediction class 0)."""
    check_header(path)
    try:
        tensors = load_file(path)
    except Exception as e:  # the library's own checks (overlapping tensors, and the like)
        raise InputError(f"{printable(path, 100)}: not a safetensors file ({short(e, 80)})") \
            from None
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise InputError(f"{printable(path, 100)}: tensor {printable(name, 60)} holds NaN or "
                             "inf; retrain, or pick another checkpoint")
    return tensors


def load_base_for(checkpoint, config, tensors):
    """load_base_model for a checkpoint's validated config, refusing in one line, before any
    adapter is made, targets this base lacks. Names are printed bounded and escaped."""
    base = config["base_model"]
    try:
        model, tokenizer, task_paths = load_base_model(base, len(config["labels"]),
                                                       config["max_length"])
    except InputError as e:  # its message names the base in full
        raise InputError(str(e).replace(base, printable(base, 60))) from None
    linears = target_paths(model, ["all-linear"], skip=task_paths)
    unknown = [t for t in config["targets"] if t != "all-linear"
               and not any(p == t or p.endswith("." + t) for p in linears)]
    if unknown:
        raise InputError(f"{printable(checkpoint, 100)}: {len(unknown):,} of its targets are not "
                         f"layers of {printable(base, 60)}, such as {printable(unknown[0], 40)}; "
                         "pick the checkpoint that goes with it")
    r = config["r"]  # every adapter the model will make must be in the file, of its shape
    for path in target_paths(model, config["targets"], skip=task_paths):
        layer = model.get_submodule(path)
        shapes = {".lora_A.weight": (r, layer.in_features),
                  ".lora_B.weight": (layer.out_features, r)}
        for end, shape in shapes.items():
            held = tensors.get(path + end)
            if held is None or tuple(held.shape) != shape:
                name = printable(path + end, 80)
                what = f"it lacks {name}" if held is None else f"{name} does not fit"
                raise InputError(f"{printable(checkpoint, 100)}: its tensors do not fit "
                                 f"{printable(base, 60)} with r={r}: {what} (of shape {shape}); "
                                 "retrain, or pick the checkpoint that goes with it")
    return model, tokenizer, task_paths


def check_fits(checkpoint, config, tensors, state, task_paths):
    """One line if the checkpoint lacks an adapter or a new module's tensor, or holds a tensor
    that is not the model's or not of its shape."""
    needed = {n for n in state if ".lora_" in n or any(n.startswith(p + ".") for p in task_paths)}
    lacking = sorted(needed - set(tensors))
    foreign = sorted(n for n, t in tensors.items() if n not in state or state[n].shape != t.shape)
    if lacking or foreign:
        what = f"it lacks {printable(lacking[0], 80)}" if lacking else \
            f"{printable(foreign[0], 80)} does not fit"
        more = len(lacking) + len(foreign) - 1
        raise InputError(f"{printable(checkpoint, 100)}: its tensors do not fit "
                         f"{printable(config['base_model'], 60)} with r={config['r']}, "
                         f"{len(config['labels'])} labels: {what}"
                         + (f" and {more} more" if more else "")
                         + "; retrain, or pick the checkpoint that goes with it")


def offline_if_unreachable(*names, seconds=3.0):
    """With HF_HUB_OFFLINE unset and a hub name among `names` (not a local path): if the hub (or
    the proxy to it) does not accept a connection within `seconds`, go offline, so that the cache
    still serves and a model or dataset it lacks is one line at once, not a minute of retries."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or all(not name or os.path.exists(name) for name in names):
        return
    proxy = urllib.request.getproxies().get(urllib.parse.urlsplit(constants.ENDPOINT).scheme)
    where = urllib.parse.urlsplit(proxy if proxy and "://" in proxy else constants.ENDPOINT)
    answered = []

    def connect():
        try:  # refused, no route, no such name: no answer
            port = where.port or (443 if where.scheme == "https" else 80)
            socket.create_connection((where.hostname, port), timeout=seconds).close()
            answered.append(True)
        except (OSError, ValueError):
            pass
    probe = threading.Thread(target=connect, daemon=True)  # a name lookup has no timeout
    probe.start()
    probe.join(seconds)
    if not answered:
        os.environ["HF_HUB_OFFLINE"] = "1"  # for what is imported later
        constants.HF_HUB_OFFLINE = True
        if "datasets" in sys.modules:
            sys.modules["datasets"].config.HF_HUB_OFFLINE = True


def read_checkpoint(checkpoint):
    """(config, tensors), both checked, from a train.py checkpoint folder or a PEFT LoRA adapter
    folder: config.json by CONFIG_RULES, the tensors by read_tensors."""
    if os.path.isfile(os.path.join(checkpoint, PEFT_CONFIG_FILE)):
        config, tensors = read_peft_adapter(checkpoint)
    else:
        config_path = os.path.join(checkpoint, CONFIG_FILE)
        adapter_path = os.path.join(checkpoint, ADAPTER_FILE)
        if not (os.path.isfile(config_path) and os.path.isfile(adapter_path)):
            raise InputError(f"{printable(checkpoint, 100)}: not a checkpoint folder (needs "
                             f"{CONFIG_FILE} and {ADAPTER_FILE}, or a PEFT {PEFT_CONFIG_FILE}); "
                             "pass the --out folder of a finished train.py run")
        config = check_config(read_json(config_path), printable(config_path, 100))
        tensors = read_tensors(adapter_path)
    offline_if_unreachable(config["base_model"])  # a base on the hub: seconds, not 50
    return config, tensors


def save_tensors(path, tensors, metadata=None):
    """Tensors to a safetensors file, atomically (CPU copies, so training can go on meanwhile)."""
    cpu = {n: t.detach().to("cpu", copy=True).contiguous() for n, t in tensors.items()}
    write_atomically(path, lambda f: f.write(safetensors_bytes(cpu, metadata)), mode="wb")


# PEFT's layout of the same adapter: its key = PEFT_PREFIX + ours, modules saved whole under
# modules_to_save
PEFT_PREFIX = "base_model.model."
PEFT_NAMES = {"base_model": "base_model_name_or_path", "alpha": "lora_alpha",
              "targets": "target_modules", "dropout": "lora_dropout"}
# PEFT options that change what the adapter computes, which we do not implement: each must be
# unset (absent, null, false, [] or {}); PEFT's own saved defaults are all unset
PEFT_UNSET = ["use_rslora", "use_dora", "layers_to_transform", "layers_pattern", "rank_pattern",
              "alpha_pattern", "fan_in_fan_out", "megatron_config", "loftq_config",
              "exclude_modules", "trainable_token_indices", "alora_invocation_tokens",
              "use_qalora", "layer_replication", "lora_bias", "target_parameters", "use_bdlora",
              "arrow_config", "monteclora_config", "kasa_config"]


def export_peft(checkpoint, folder):
    """Write a train.py checkpoint as a PEFT adapter: `PeftModel.from_pretrained(base, folder)`.

    target_modules lists the exact paths adapted (PEFT matches them by suffix, as --targets does);
    modules_to_save, the modules saved whole: the head (PEFT's name for it), and any other. The
    class names go in auto_mapping's id2label, which PEFT keeps as written and does not read.
    """
    config, tensors = read_checkpoint(checkpoint)
    whole = sorted({n.split(".")[0] if n.split(".")[0] in ("classifier", "score")
                    else n.rpartition(".")[0] for n in tensors if ".lora_" not in n})
    peft_config = {"peft_type": "LORA", "task_type": "SEQ_CLS",
                   "base_model_name_or_path": config["base_model"], "r": config["r"],
                   "lora_alpha": config["alpha"], "lora_dropout": config.get("dropout", 0.0),
                   "target_modules": config["targets"], "bias": "none", "modules_to_save": whole,
                   "fan_in_fan_out": False, "inference_mode": True,
                   "auto_mapping": {"id2label": dict(enumerate(config["labels"]))}}
    os.makedirs(folder, exist_ok=True)
    peft_tensors = {PEFT_PREFIX + name: t for name, t in tensors.items()}
    save_tensors(os.path.join(folder, PEFT_WEIGHTS_FILE), peft_tensors)
    write_atomically(os.path.join(folder, PEFT_CONFIG_FILE),
                     lambda f: json.dump(peft_config, f, indent=2))


def export_merged(checkpoint, folder):
    """A transformers model folder of the checkpoint: the adapters merged into their weights, the
    head, the tokenizer (cutting at the checkpoint's max length) and the class names, so that
    `pipeline("text-classification", model=folder)` loads it with no code of ours. It is written
    beside and renamed into place: a folder check_merged_folder let through is replaced whole."""
    model, tokenizer, config = load_model(checkpoint)
    merge_lora(model)
    model.config.id2label = dict(enumerate(config["labels"]))
    model.config.label2id = {name: i for i, name in enumerate(config["labels"])}
    setattr(model.config, MERGED_MARK, os.path.abspath(checkpoint))  # check_merged_folder reads it
    tokenizer.model_max_length = config["max_length"] or tokenizer.model_max_length
    fresh = None
    try:
        fresh = tempfile.mkdtemp(prefix=".merged-", dir=os.path.dirname(os.path.abspath(folder)))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(fresh, 0o777 & ~umask)  # as a folder made by mkdir, not mkdtemp's 0700
        model.save_pretrained(fresh)
        tokenizer.save_pretrained(fresh)
        if os.path.isdir(folder):
            os.rename(folder, fresh + ".old")
        os.rename(fresh, folder)
        shutil.rmtree(fresh + ".old", ignore_errors=True)
    except OSError as e:  # a full disk, no permission: the folder there before is kept
        raise InputError(f"cannot write the merged model to {printable(folder, 100)} "
                         f"({e.strerror or short(e, 60)}); free some space, or write elsewhere") \
            from None
    finally:
        if fresh:
            shutil.rmtree(fresh, ignore_errors=True)


MERGED_MARK = "lora_merged_from"  # in config.json, the checkpoint a merged folder was made of


def check_merged_folder(folder, *protected):
    """One line unless --export-merged names a new folder in an existing one, or a folder that
    export_merged wrote before; and never one that is, holds or lies in a folder this command reads
    or writes (`protected`: the checkpoint, --out, the base model, the data)."""
    where = printable(folder, 100)
    if "\0" in folder or os.path.islink(folder) or os.path.lexists(folder) and \
            not os.path.isdir(folder):
        raise InputError(f"--export-merged {where} is a link or a file; give a new folder")
    if not os.path.isdir(os.path.dirname(os.path.abspath(folder))):
        raise InputError(f"--export-merged {where}: its folder does not exist; create it first")
    real = os.path.realpath(folder)
    for path in (p for p in protected if p and "\0" not in p):  # --out may not exist yet
        other = os.path.realpath(path)
        if os.path.commonpath([real, other]) in (real, other):
            raise InputError(f"--export-merged {where} is, holds or lies in {printable(path, 100)}"
                             ", which this command reads or writes; give a new folder")
    if os.path.isdir(folder) and os.listdir(folder):
        config = os.path.join(folder, CONFIG_FILE)
        if not (os.path.isfile(config) and MERGED_MARK in read_json(config)):
            raise InputError(f"--export-merged {where} holds files that are not a merged model of "
                             "ours: nothing there is replaced; give a new folder")


def unsupported_peft_options(peft_config):
    """The names (with values, bounded) of the options set that only PEFT implements."""
    unset = lambda v: v is None or v is False or v in ([], {})  # noqa: E731  (0 is layer 0)
    found = [k for k in PEFT_UNSET if not unset(peft_config.get(k))]
    init = peft_config.get("init_lora_weights", True)
    if not (init is True or init is False or init == "gaussian"):
        found.append(f"init_lora_weights {short(init, 20)}")
    if peft_config.get("peft_type") != "LORA":
        found.append(f"peft_type {short(peft_config.get('peft_type'), 20)}")
    if peft_config.get("bias", "none") != "none":
        found.append(f"bias {short(peft_config.get('bias'), 20)}")
    if not isinstance(peft_config.get("target_modules"), list):
        found.append("target_modules that is not a list")
    return found


def read_peft_adapter(folder):
    """(config, tensors) in our layout from a PEFT LoRA adapter folder (plain LoRA on Linears),
    checked as ours are; any option only PEFT implements is refused, naming it."""
    config_path = os.path.join(folder, PEFT_CONFIG_FILE)
    where = printable(config_path, 100)
    peft_config = read_json(config_path)
    unsupported = unsupported_peft_options(peft_config)
    if unsupported:
        raise InputError(f"{where}: only plain LoRA adapters load here; this one has "
                         f"{', '.join(unsupported)}")  # our names, and values via short
    config = {ours: peft_config[theirs] for ours, theirs in
              {"r": "r", **PEFT_NAMES}.items() if theirs in peft_config}
    check_config({**config, "labels": ["0"], "max_length": 512}, where, PEFT_NAMES)
    weights = read_tensors(os.path.join(folder, PEFT_WEIGHTS_FILE))
    # strip PEFT's prefix, and the adapter name PEFT keeps in a module under modules_to_save
    tensors = {k.removeprefix(PEFT_PREFIX).replace(".modules_to_save.default.", "."): t
               for k, t in weights.items()}
    # the head's last layer maps to the labels and is its narrowest (RoBERTa's dense is wide)
    head_widths = [t.shape[0] for k, t in tensors.items()
                   if k.startswith(("classifier.", "score.")) and t.dim() == 2]
    if not head_widths or not 1 <= min(head_widths) <= MAX_LABELS:
        found = f"one of {min(head_widths):,} rows" if head_widths else "none"
        raise InputError(f"{printable(folder, 100)}: needs a trained classifier head of 1 to "
                         f"{MAX_LABELS:,} rows (labels) in modules_to_save, has {found}")
    config.update(labels=peft_labels(peft_config, min(head_widths), where), max_length=None,
                  targets=sorted(config["targets"]))  # max_length: the base's own
    return config, tensors


def peft_labels(peft_config, count, where):
    """The class names of a PEFT adapter: auto_mapping's id2label (ours), or "0".."K-1"."""
    names = (peft_config.get("auto_mapping") or {}).get("id2label") \
        if isinstance(peft_config.get("auto_mapping"), dict) else None
    if names is None:
        return [str(i) for i in range(count)]
    if not (isinstance(names, dict) and set(names) == {str(i) for i in range(count)}
            and all(isinstance(n, str) for n in names.values())):
        raise InputError(f"{where}: auto_mapping's id2label must name each of the head's {count:,} "
                         "classes \"0\"..\"K-1\" with a string; fix it, or delete it")
    labels = [names[str(i)] for i in range(count)]
    right, what = CONFIG_RULES["labels"]
    if not right(labels):
        raise InputError(f"{where}: auto_mapping's id2label must be {what}")
    return labels


def base_model_of(checkpoint):
    """The base_model a checkpoint folder's config names (ours or PEFT's), or None if it names
    none that can be read: the checks of load_model say why, later."""
    for file, field in ((PEFT_CONFIG_FILE, PEFT_NAMES["base_model"]), (CONFIG_FILE, "base_model")):
        path = os.path.join(checkpoint, file)
        if os.path.isfile(path):
            try:
                base = read_json(path).get(field)
            except InputError:
                return None
            return base if isinstance(base, str) and "\0" not in base else None
    return None
