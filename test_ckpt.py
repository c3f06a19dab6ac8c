"""Tests: a checkpoint folder from elsewhere is checked before anything is built from it.

    python -m pytest -q test_ckpt.py

One valid tiny checkpoint (ours and PEFT's layout) is written by hand, never trained; each case
corrupts a copy and expects one bounded line (data.DataError) naming the problem, fast.
"""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaForSequenceClassification

import checkpoint
import data
import predict
from lora import inject_lora, merge_lora

HERE = os.path.dirname(os.path.abspath(__file__))
WORDS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"] + [f"w{i}" for i in range(40)]
LABELS = ["world", "sports", "business", "sci/tech"]


def save_tiny_base(folder):
    """A tiny random RoBERTa encoder and a word-level tokenizer, saved like a hub model."""
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64, num_labels=4,
                           max_position_embeddings=130, pad_token_id=1, bos_token_id=0,
                           eos_token_id=2)
    RobertaForSequenceClassification(config).base_model.save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>", unk_token="<unk>", mask_token="<mask>",
                            model_max_length=128).save_pretrained(folder)


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """{"ours": folder, "peft": folder, "model": the model they hold, merged}: no training, the
    adapters and the head set at random, then saved as train.py and export_peft save them."""
    root = tmp_path_factory.mktemp("ckpt")
    save_tiny_base(root / "base")
    model, _, new = checkpoint.load_base_model(str(root / "base"), len(LABELS))
    inject_lora(model, 2, 4.0, targets=["query", "value"], skip=new)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B" in name or name.startswith("classifier."):
                p.normal_(std=0.5)
    config = {"base_model": str(root / "base"), "labels": LABELS, "r": 2, "alpha": 4.0,
              "trained_r": 2, "init": "lora", "dropout": 0.0, "targets": ["query", "value"],
              "max_length": 64}
    checkpoint.save_checkpoint(str(root / "ours"), checkpoint.checkpoint_tensors(model, new),
                               config)
    checkpoint.export_peft(str(root / "ours"), str(root / "peft"))
    return {"ours": str(root / "ours"), "peft": str(root / "peft"),
            "model": merge_lora(model).eval()}


# --- how a copy is corrupted ----------------------------------------------------------------------

def edit_json(name, **changes):
    """A corruption: set (or, with ..., delete) fields of the folder's JSON file `name`."""
    def corrupt(folder):
        path = os.path.join(folder, name)
        config = json.load(open(path))
        for k, v in changes.items():
            config.pop(k) if v is ... else config.__setitem__(k, v)
        with open(path, "w") as f:
            json.dump(config, f)
    return corrupt


def config(**changes):
    return "ours", edit_json(checkpoint.CONFIG_FILE, **changes)


def peft(**changes):
    return "peft", edit_json(checkpoint.PEFT_CONFIG_FILE, **changes)


def raw_config(text):
    """A corruption: config.json replaced by this text."""
    def corrupt(folder):
        with open(os.path.join(folder, checkpoint.CONFIG_FILE), "w") as f:
            f.write(text)
    return "ours", corrupt


def header_of(path):
    raw = open(path, "rb").read()
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def write_raw(path, header, body):
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + body)


def edit_header(change):
    """A corruption: change(header, body) edits the header of adapter.safetensors in place."""
    def corrupt(folder):
        path = os.path.join(folder, checkpoint.ADAPTER_FILE)
        header, body = header_of(path)
        change(header, body)
        write_raw(path, header, body)
    return "ours", corrupt


def first_tensor(header):
    return header[sorted(k for k in header if k != "__metadata__")[0]]


def raw_adapter(raw):
    """A corruption: adapter.safetensors replaced by these bytes."""
    def corrupt(folder):
        with open(os.path.join(folder, checkpoint.ADAPTER_FILE), "wb") as f:
            f.write(raw)
    return "ours", corrupt


def edit_tensors(change, kind="ours"):
    """A corruption: change(tensors) edits the tensors, saved as a valid safetensors file."""
    name = checkpoint.ADAPTER_FILE if kind == "ours" else checkpoint.PEFT_WEIGHTS_FILE
    def corrupt(folder):
        path = os.path.join(folder, name)
        tensors = load_file(path)
        change(tensors)
        save_file(tensors, path)
    return kind, corrupt


def set_nan(tensors):
    tensors["classifier.out_proj.weight"][1, 2] = float("nan")


def set_int(tensors):
    tensors["classifier.out_proj.bias"] = torch.arange(4)


def add_evil_name(tensors):
    tensors["evil\nname\x1b[31m"] = torch.zeros(2)


def peft_head(rows, columns):
    """A change: every matrix of the head made rows x columns (the labels: the fewest rows)."""
    def change(tensors):
        for key in [k for k in tensors if ".classifier." in k and tensors[k].dim() == 2]:
            tensors[key] = torch.zeros(rows, columns)
    return change


def overlap(header, body):  # two tensors on the same bytes: more bytes named than the file has
    names = sorted(k for k in header if k != "__metadata__")
    big = max(names, key=lambda k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0])
    header["copy"] = dict(header[big])
    header["copy2"] = dict(header[big])


# id: (which folder, corruption, a phrase the line must hold)
CASES = {
    # 1. config.json: size, syntax, then each field's type and range
    "config-above-1MiB": (raw_config("{" + " " * 2**20 + "}"), "above 1 MiB"),
    "config-not-json": (raw_config("{'r': 2"), "not JSON"),
    "config-a-list": (raw_config("[1, 2]"), "not a JSON object"),
    "config-nested-deep": (raw_config("[" * 100_000 + "]" * 100_000), "nested too deep"),
    "config-int-5000-digits": (raw_config('{"r": ' + "9" * 5000 + "}"), "4,300 digits"),
    "base-model-missing": (config(base_model=...), "lacks `base_model`"),
    "base-model-empty": (config(base_model=""), "`base_model` must be a non-empty string"),
    "base-model-int": (config(base_model=7), "`base_model` must be"),
    "labels-ints": (config(labels=[0, 1, 2, 3]), "`labels` must be a list of 1 to 10,000 str"),
    "labels-empty": (config(labels=[]), "`labels` must be"),
    "labels-10001": (config(labels=["a"] * 10_001), "`labels` must be"),
    "labels-3M": (config(labels=["a"] * 3_000_000), "above 1 MiB"),
    "r-bool": (config(r=True), "`r` must be an integer from 1 to 4096"),
    "r-float": (config(r=2.0), "`r` must be an integer"),
    "r-string": (config(r="2"), "`r` must be an integer"),
    "r-zero": (config(r=0), "`r` must be an integer"),
    "r-1e7": (config(r=10**7), "`r` must be an integer"),
    "alpha-nan": (config(alpha=float("nan")), "`alpha` must be a finite number"),
    "alpha-inf": (config(alpha=float("inf")), "`alpha` must be a finite number"),
    "alpha-zero": (config(alpha=0), "`alpha` must be"),
    "alpha-string": (config(alpha="4"), "`alpha` must be"),
    "targets-empty": (config(targets=[]), "`targets` must be a list"),
    "targets-a-string": (config(targets="query"), "`targets` must be a list"),
    "targets-10001": (config(targets=["query"] * 10_001), "`targets` must be"),
    "targets-1e6-unknown": (config(targets=[f"t{i}" for i in range(10**6)]), "above 1 MiB"),
    "targets-10000-unknown": (config(targets=[f"t{i}\n" for i in range(10**4)]),
                              "10,000 of its targets are not layers"),
    "max-length-1": (config(max_length=1), "`max_length` must be an integer from 2"),
    "max-length-string": (config(max_length="64"), "`max_length` must be"),
    "dropout-1": (config(dropout=1.0), "`dropout` must be"),
    "init-olora": (config(init="olora"), '`init` must be "lora" or "pissa"'),
    "trained-r-string": (config(trained_r="2"), "`trained_r` must be"),
    "base-model-control-chars": (config(base_model="no\nsuch\x1bmodel"), "cannot load the model"),
    # 2. the safetensors header, read before any tensor
    "header-above-100MiB": (raw_adapter((2**40).to_bytes(8, "little") + b"{}"), "header length"),
    "header-beyond-file": (raw_adapter((100).to_bytes(8, "little") + b"{}"), "beyond the file"),
    "header-short-file": (raw_adapter(b"\x01\x00"), "not a safetensors file"),
    "header-not-json": (raw_adapter((3).to_bytes(8, "little") + b"{x}"), "header is not JSON"),
    "header-int-dtype": (edit_tensors(set_int), "not a floating dtype"),
    "header-negative-shape": (edit_header(lambda h, b: first_tensor(h).update(shape=[-1, 4])),
                              "not a list of at most 8 non-negative integers"),
    "header-string-shape": (edit_header(lambda h, b: first_tensor(h).update(shape=["4"])),
                            "non-negative integers"),
    "header-offsets-beyond": (edit_header(
        lambda h, b: first_tensor(h).update(data_offsets=[0, len(b) + 8])), "beyond the file"),
    "header-span-not-shape": (edit_header(
        lambda h, b: first_tensor(h).update(shape=[10**6, 10**6])), "not its shape's size"),
    "header-total-beyond": (edit_header(overlap), "more than the file's"),
    # 3. values
    "tensor-nan": (edit_tensors(set_nan), "classifier.out_proj.weight holds NaN or inf"),
    "tensor-name-control-chars": (edit_tensors(add_evil_name), "does not fit"),
    # 4. PEFT's options
    "peft-init-pissa": (peft(init_lora_weights="pissa"), "init_lora_weights 'pissa'"),
    "peft-init-olora": (peft(init_lora_weights="olora"), "init_lora_weights 'olora'"),
    "peft-init-loftq": (peft(init_lora_weights="loftq"), "init_lora_weights 'loftq'"),
    "peft-use-rslora": (peft(use_rslora=True), "use_rslora"),
    "peft-use-dora": (peft(use_dora=True), "use_dora"),
    "peft-layers-to-transform-0": (peft(layers_to_transform=0), "layers_to_transform"),
    "peft-layers-pattern": (peft(layers_pattern="layer"), "layers_pattern"),
    "peft-rank-pattern": (peft(rank_pattern={"query": 4}), "rank_pattern"),
    "peft-alpha-pattern": (peft(alpha_pattern={"query": 4}), "alpha_pattern"),
    "peft-fan-in-fan-out": (peft(fan_in_fan_out=True), "fan_in_fan_out"),
    "peft-megatron-config": (peft(megatron_config={"tp": 2}), "megatron_config"),
    "peft-loftq-config": (peft(loftq_config={"loftq_bits": 4}), "loftq_config"),
    "peft-bias-all": (peft(bias="all"), "bias 'all'"),
    "peft-target-modules-pattern": (peft(target_modules=".*query"), "target_modules that is not"),
    "peft-lora-alpha-missing": (peft(lora_alpha=...), "lacks `lora_alpha`"),
    "peft-r-missing": (peft(r=...), "lacks `r`"),
    "peft-r-string": (peft(r="2"), "`r` must be an integer"),
    "peft-r-1e9": (peft(r=10**9), "`r` must be an integer from 1 to 4096"),
    "peft-lora-alpha-nan": (peft(lora_alpha=float("nan")), "`lora_alpha` must be a finite"),
    "peft-head-0-rows": (edit_tensors(peft_head(0, 32), "peft"), "has one of 0 rows"),
    "peft-head-1e9-rows": (edit_tensors(peft_head(10**9, 0), "peft"), "1,000,000,000 rows"),
}
# allocating these would take gigabytes (terabytes for PEFT's r): their peak memory is measured
ALLOCATION_CASES = ["r-1e7", "labels-3M", "peft-r-1e9", "peft-head-1e9-rows"]


def corrupted_copy(valid, tmp_path, case_id):
    (kind, corrupt), _ = CASES[case_id]
    folder = str(tmp_path / case_id)
    shutil.copytree(valid[kind], folder)
    corrupt(folder)
    return folder


@pytest.mark.parametrize("case_id", list(CASES))
def test_a_malformed_checkpoint_is_refused_in_one_bounded_line(valid, tmp_path, case_id):
    folder = corrupted_copy(valid, tmp_path, case_id)
    start = time.perf_counter()
    with pytest.raises(data.DataError) as refused:
        checkpoint.load_model(folder)
    seconds = time.perf_counter() - start
    message = str(refused.value)
    assert CASES[case_id][1] in message
    assert seconds < 3, seconds
    assert len(message) <= 400, message[:500]
    assert message.isprintable(), message  # no newline, no escape code: each shown escaped


@pytest.mark.parametrize("case_id", ALLOCATION_CASES)
def test_a_checkpoint_that_would_allocate_gigabytes_is_refused_first(valid, tmp_path, case_id):
    """Measured in a child by its VmHWM (peak RSS, kB): ru_maxrss keeps the parent's across exec."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("VmHWM is Linux's")
    folder = corrupted_copy(valid, tmp_path, case_id)
    script = ("import checkpoint, data\n"
              "peak = lambda: int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])\n"
              "before = peak()\n"
              "try:\n"
              f"    checkpoint.load_model({folder!r})\n"
              "except data.DataError:\n"
              "    print(peak() - before)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=HERE, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip(), done.stderr[-2000:]
    assert int(done.stdout) < 500 * 1024, f"peak memory grew by {int(done.stdout) // 1024} MB"


@pytest.mark.parametrize("kind", ["ours", "peft"])
def test_a_valid_checkpoint_still_loads_and_predicts(valid, tmp_path, capsys, kind):
    model, tokenizer, config = checkpoint.load_model(valid[kind])
    labels = LABELS if kind == "ours" else ["0", "1", "2", "3"]
    assert config["labels"] == labels and config["r"] == 2 and config["alpha"] == 4.0
    texts = [" ".join(f"w{(i * 7 + j) % 40}" for j in range(3 + i % 9)) for i in range(24)]
    ids, mask = data.pad_batch(data.tokenize(tokenizer, texts, 64), range(len(texts)),
                               tokenizer.pad_token_id)
    with torch.no_grad():
        expected = valid["model"](input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, expected)
    rows = [{"text": t, "label": labels[i % 4]} for i, t in enumerate(texts)]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "sub.csv"
    predict.main([str(source), "--checkpoint", valid[kind], "--out", str(out),
                  "--precision", "fp32"])
    submitted = [line.split(",")[1] for line in out.read_text().split()[1:]]
    assert submitted == [str(k) for k in expected.argmax(-1).tolist()]
    assert "accuracy" in capsys.readouterr().out  # the per-class report, with string labels
