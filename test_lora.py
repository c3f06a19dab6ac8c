"""Tests: offline, on tiny random RoBERTa and BERT models built here from a config.

    python -m pytest -q test_lora.py

In the order of the files: lora.py, data.py, train.py, predict.py, checkpoint.py, then operations
(resume, bad input, torchrun) and tables.py.
"""
import contextlib
import csv
import importlib.util
import io
import json
import math
import os
import pickle
import random
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never touch the network, even run by hand
os.environ["XDG_CACHE_HOME"] = __import__("tempfile").mkdtemp(prefix="lora-test-cache-")  # token cache: not ~
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast, RobertaConfig,
                          RobertaForSequenceClassification)

import checkpoint
import data
import tables
import predict
import train
from lora import LoRALinear, PiSSALinear, count_per_rank, inject_lora, largest_rank, merge_lora, parameter_table, target_paths

HERE = os.path.dirname(os.path.abspath(__file__))
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's ids: <s>=0, <pad>=1, </s>=2
FILLER = [f"w{i}" for i in range(40)]
KEYWORDS = [[f"k{c}_{i}" for i in range(5)] for c in range(4)]  # each class has its own words


def tiny_config(kind, vocab_size, num_labels=4):
    shared = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, num_labels=num_labels)
    if kind == "roberta":
        return RobertaConfig(**shared, max_position_embeddings=130, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    return BertConfig(**shared, max_position_embeddings=128, pad_token_id=1)


def tiny_model(kind, num_labels=4, seed=0):
    torch.manual_seed(seed)
    cls = RobertaForSequenceClassification if kind == "roberta" else BertForSequenceClassification
    return cls(tiny_config(kind, len(SPECIALS) + len(FILLER) + 20, num_labels)).eval()


def save_tokenizer(folder):
    """A word-level tokenizer over this file's vocabulary, saved like a hub model's."""
    vocab = {t: i for i, t in enumerate(SPECIALS + FILLER + [w for ws in KEYWORDS for w in ws])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>", mask_token="<mask>", model_max_length=128).save_pretrained(folder)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """Folders holding a tiny random RoBERTa and BERT with a word-level tokenizer, like a hub model."""
    dirs = {}
    for kind in ("roberta", "bert"):
        folder = tmp_path_factory.mktemp(kind)
        save_tokenizer(folder)
        tiny_model(kind).base_model.save_pretrained(folder)  # the encoder alone, as on the hub: the head is new
        dirs[kind] = str(folder)
    return dirs


def synthetic_rows(n, seed):
    """Texts whose class shows in a few keywords among filler words: learnable, and far from trivial for chance."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(4)
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 30))] + rng.choices(KEYWORDS[label], k=4)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_csv(path, rows, columns=("text", "label")):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return str(path)


def read_submission(path):
    with open(path) as f:
        return list(csv.reader(f))


@pytest.fixture
def on_cpu(monkeypatch):
    """Runs compared bit for bit train on the CPU, also on a machine with a GPU (whose kernels may sum in any
    order); processes started here see no GPU either."""
    monkeypatch.setattr(train, "pick_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(predict, "pick_device", lambda: torch.device("cpu"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def device_of(model):
    return next(model.parameters()).device


def adapters_of(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


# --- lora.py: the method ---------------------------------------------------------------------------

def test_lora_linear_computes_w0_plus_scaled_ba():
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, r=2, alpha=4, dropout=0.0)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 6)
    w = base.weight + (4 / 2) * layer.lora_B.weight @ layer.lora_A.weight
    assert layer.lora_A.weight.shape == (2, 6) and layer.lora_B.weight.shape == (5, 2)
    torch.testing.assert_close(layer(x), x @ w.T + base.bias)


def test_dropout_acts_on_the_adapter_input_only():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 5), r=2, alpha=2, dropout=0.5).train()
    nn.init.normal_(layer.lora_B.weight)
    seen = []
    layer.dropout.register_forward_hook(lambda module, inputs, output: seen.append((inputs[0], output)))
    x = torch.randn(4, 8)
    out = layer(x)
    dropout_in, dropped = seen[0]
    assert dropout_in is x  # dropout sees the layer's input (8 wide), not the adapter's output (5 wide)
    assert (dropped == 0).any() and ((dropped == 0) | torch.isclose(dropped, 2 * x)).all()  # p=0.5: 0 or 2x
    torch.testing.assert_close(out, layer.base(x) + layer.lora_B(layer.lora_A(dropped)))  # the base path whole
    layer.eval()
    torch.testing.assert_close(layer(x), layer.base(x) + layer.lora_B(layer.lora_A(x)))  # no dropout in eval


@pytest.mark.parametrize("kind", ["roberta", "bert"])
def test_untrained_adapter_leaves_outputs_unchanged(kind):
    model = tiny_model(kind)
    ids = torch.randint(5, 40, (3, 12))
    before = model(input_ids=ids).logits
    inject_lora(model, r=4, alpha=8)
    torch.testing.assert_close(model.eval()(input_ids=ids).logits, before, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["roberta", "bert"])
def test_merged_and_unmerged_outputs_agree(kind):
    model = tiny_model(kind)
    inject_lora(model, r=2, alpha=4)
    for m in adapters_of(model):
        nn.init.normal_(m.lora_B.weight, std=0.5)
    ids = torch.randint(5, 40, (3, 12))
    unmerged = model(input_ids=ids).logits
    merge_lora(model)
    assert not adapters_of(model)
    torch.testing.assert_close(model(input_ids=ids).logits, unmerged, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unmerged, tiny_model(kind)(input_ids=ids).logits)  # the update did matter


def test_inject_lora_freezes_everything_but_the_adapters():
    model = tiny_model("roberta")
    paths = inject_lora(model, r=2, alpha=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert paths == [f"roberta.encoder.layer.{i}.attention.self.{t}" for i in (0, 1) for t in ("query", "value")]
    assert trainable == {f"{p}.lora_{m}.weight" for p in paths for m in "AB"}


def test_gradients_reach_a_and_b():
    model = tiny_model("roberta")
    inject_lora(model, r=2, alpha=4)
    logits = model(input_ids=torch.randint(5, 40, (4, 10))).logits
    nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).backward()
    layer = model.roberta.encoder.layer[1].attention.self.value
    assert layer.lora_B.weight.grad.abs().sum() > 0  # B gets a gradient at once (A is non-zero)
    assert layer.lora_A.weight.grad.abs().sum() == 0  # dL/dA = B^T (...) = 0 while B is zero: that is LoRA
    assert model.roberta.embeddings.word_embeddings.weight.grad is None
    assert layer.base.weight.grad is None
    with torch.no_grad():  # one step on B makes A's gradient non-zero too
        layer.lora_B.weight.normal_()
    model.zero_grad()
    nn.functional.cross_entropy(model(input_ids=torch.randint(5, 40, (4, 10))).logits,
                                torch.tensor([0, 1, 2, 3])).backward()
    assert layer.lora_A.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["roberta", "bert"])
def test_pissa_starts_on_the_top_singular_directions_and_leaves_the_model_unchanged(kind):
    model = tiny_model(kind)
    ids = torch.randint(5, 40, (3, 12))
    before, weights = model(input_ids=ids).logits, {n: m.weight.clone() for n, m in model.named_modules()
                                                     if isinstance(m, nn.Linear)}
    inject_lora(model, r=4, alpha=8, targets=["all-linear"], skip={"classifier"}, layer=PiSSALinear)
    torch.testing.assert_close(model.eval()(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
    for path, layer in ((n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)):
        U, S, Vh = torch.linalg.svd(weights[path])
        top = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]  # Eckart-Young: the best rank-4 approximation of W0
        torch.testing.assert_close(layer.delta_weight(), top, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.base.weight + layer.delta_weight(), weights[path], rtol=1e-5, atol=1e-6)
        A, B = layer.as_plain_lora()  # saved: s (B A - B0 A0), plain LoRA of rank 2r, zero before training
        assert A.shape == (8, layer.base.in_features) and B.shape == (layer.base.out_features, 8)
        torch.testing.assert_close(B @ A, torch.zeros_like(B @ A), rtol=0, atol=1e-5)


def test_pissa_takes_the_svd_in_fp32_and_merges_like_lora(monkeypatch):
    seen, svd = [], torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda w, **k: seen.append(w.dtype) or svd(w, **k))
    layer = PiSSALinear(nn.Linear(16, 12).to(torch.bfloat16), r=3, alpha=6)
    assert seen == [torch.float32] and layer.lora_A.weight.dtype == torch.bfloat16
    layer = PiSSALinear(nn.Linear(16, 12), r=3, alpha=6)
    nn.init.normal_(layer.lora_B.weight)  # as if trained
    x = torch.randn(5, 16)
    unmerged = layer(x)
    A, B = layer.as_plain_lora()
    pretrained = layer.base.weight + layer.scale * layer.B0 @ layer.A0  # W0, as the base model holds it
    torch.testing.assert_close(unmerged, x @ (pretrained + (6 / 3) * B @ A).T + layer.base.bias, rtol=1e-5, atol=1e-5)
    merged = merge_lora(nn.Sequential(layer))
    torch.testing.assert_close(merged(x), unmerged, rtol=1e-5, atol=1e-5)


ROBERTA_LAYER = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "intermediate.dense", "output.dense"]


@pytest.mark.parametrize("kind,targets,adapted", [
    ("roberta", ["query", "value"], ["attention.self.query", "attention.self.value"]),
    ("roberta", ["attention.output.dense"], ["attention.output.dense"]),
    ("roberta", ["intermediate.dense", "key"], ["attention.self.key", "intermediate.dense"]),
    ("roberta", ["output.dense"], ["attention.output.dense", "output.dense"]),  # a suffix of both paths
    ("roberta", ["dense"], ["attention.output.dense", "intermediate.dense", "output.dense"]),  # never the new head
    ("roberta", ["all-linear"], ROBERTA_LAYER),
    ("bert", ["all-linear"], ROBERTA_LAYER + ["bert.pooler.dense"]),  # the pretrained pooler stays adaptable
    ("bert", ["pooler.dense"], ["bert.pooler.dense"]),
])
def test_targets_are_dotted_suffixes_of_module_paths(model_dirs, kind, targets, adapted):
    model, _, new = checkpoint.load_base_model(model_dirs[kind], 4)
    paths = inject_lora(model, 2, 4, targets=targets, skip=new)
    layered = {p.split(".layer.")[1].split(".", 1)[1] if ".layer." in p else p for p in paths}
    assert sorted(layered) == sorted(adapted)
    assert len(paths) == sum(1 if "pooler" in a else 2 for a in adapted)  # each layer's, in both layers
    assert not any(p.startswith("classifier") for p in paths)


def test_an_unknown_target_lists_the_suffixes_that_exist(model_dirs):
    model, _, new = checkpoint.load_base_model(model_dirs["roberta"], 4)
    with pytest.raises(ValueError) as error:
        inject_lora(model, 2, 4, targets=["query", "qkv", "classifier.dense"],
                    skip=new)
    assert str(error.value) == (
        "unknown LoRA target(s) qkv, classifier.dense; targets are dotted suffixes of this model's "
        "Linear layers: attention.output.dense, attention.self.key, attention.self.query, "
        "attention.self.value, dense, intermediate.dense, key, output.dense, query, value, or all-linear")


def test_roberta_base_has_667396_trainable_parameters_and_fits_r_11_under_1m():
    with torch.device("meta"):  # the real architecture, no weights, no download
        model = RobertaForSequenceClassification(RobertaConfig(vocab_size=50265, max_position_embeddings=514,
                                                               type_vocab_size=1, num_labels=4))  # roberta-base's
    new = ["classifier"]  # the modules made for the task: the head
    paths = target_paths(model, ["query", "value"], skip=new)
    assert count_per_rank(model, paths) == 24 * (768 + 768) == 36_864
    assert largest_rank(36_864, 593_668, 1_000_000) == 11 and largest_rank(36_864, 593_668, 593_668 + 36_863) == 0
    inject_lora(model, r=2, alpha=4, targets=paths)
    model.classifier.requires_grad_(True)
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora == 24 * 2 * 2 * 768 == 73_728
    assert trainable == 73_728 + 593_668 == 667_396
    rows = {line[:25].strip(): line[25:].split()[0] for line in parameter_table(model, new).splitlines()[1:]}
    assert rows == {"frozen (pretrained)": "124,055,040", "LoRA (A and B)": "73,728",
                    "new for the task (head)": "593,668", "trainable in total": "667,396",
                    "all parameters": "124,722,436"}


# --- data.py: what a batch is ----------------------------------------------------------------------

def test_length_grouped_batches_cover_every_row_once_with_little_padding():
    rng = random.Random(0)
    lengths = [rng.randint(5, 200) for _ in range(5000)]
    batches = data.length_grouped_batches(lengths, 32, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(5000))
    assert all(len(b) <= 32 for b in batches)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert 1 - sum(lengths) / padded < 0.10
    assert batches != data.length_grouped_batches(lengths, 32, seed=2)  # another seed, another order


def test_each_epoch_of_a_run_has_its_own_order_and_every_row_once():
    lengths = [random.Random(1).randint(5, 60) for _ in range(300)]
    run = list(data.training_batches(lengths, 16, seed=4, epochs=3))
    epochs = [run[i * 19:(i + 1) * 19] for i in range(3)]  # 300 rows / 16: 19 batches an epoch
    assert len(run) == 57 and all(sorted(i for b in e for i in b) == list(range(300)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]
    assert run == list(data.training_batches(lengths, 16, seed=4, epochs=3))  # the seed fixes them all


def tokens_of(lists):
    """data.Tokens holding these token-id lists."""
    import numpy as np
    return data.Tokens(np.array([i for ids in lists for i in ids], np.int32),
                       np.cumsum([0] + [len(ids) for ids in lists]))


def test_pad_batch_pads_the_chosen_rows_to_the_longest_of_them():
    tokens = tokens_of([[9, 9, 9, 9, 9], [5, 6, 7], [8]])
    assert tokens[1].tolist() == [5, 6, 7] and tokens.lengths.tolist() == [5, 3, 1]
    ids, mask = data.pad_batch(tokens, [1, 2], pad_id=1)
    assert ids.tolist() == [[5, 6, 7], [8, 1, 1]]  # row 0 (5 long) is not in the batch: 3 columns, not 5
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long


def test_tokens_are_4_bytes_each_in_one_flat_array(model_dirs):
    import numpy as np
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["roberta"])
    texts = [r["text"] for r in synthetic_rows(300, seed=8)]
    expected = tokenizer(texts, truncation=True, max_length=64)["input_ids"]
    tokens = data.tokenize(tokenizer, texts, 64, chunk=64)  # 5 chunks
    assert [tokens[i].tolist() for i in range(300)] == expected
    assert tokens.ids.dtype == np.int32 and tokens.ids.size == sum(map(len, expected))
    assert data.tokenize(tokenizer, texts, 32).lengths.max() == 32


def peak_growth_kib(work):
    """KiB by which work() raises this process's peak resident memory: Linux's VmHWM, first reset
    to the resident memory of now (clear_refs 5), so that no earlier peak hides this one."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("the peak resident memory (VmHWM) and its reset are Linux's")
    peak = lambda: int(next(line.split()[1] for line in open("/proc/self/status")  # noqa: E731
                            if line.startswith("VmHWM")))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = peak()
    work()
    return peak() - before


def test_texts_are_cut_at_64_characters_a_token_before_the_tokenizer(model_dirs):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["roberta"])
    texts = [r["text"] for r in synthetic_rows(50, seed=9)] + [" ".join(["w1"] * 5000 + ["k2_0"])]
    tokens = data.tokenize(tokenizer, texts, 16)  # the long text is cut at 16 * 64 characters
    assert [tokens[i].tolist() for i in range(51)] == tokenizer(texts, truncation=True, max_length=16)["input_ids"]
    data.tokenize(tokenizer, ["w2 w3"], 64)  # warmed up: what a first call allocates is not the texts'
    small_kib, large_kib = (peak_growth_kib(lambda: data.tokenize(tokenizer, ["w1 " * words] * 8, 64))
                            for words in (3333, 333333))  # 8 texts of 10 kB, then of 1 MB
    assert large_kib < small_kib + 20 * 1024, (small_kib, large_kib)  # KiB of peak memory


def test_renaming_the_columns_is_one_line(tmp_path, monkeypatch):
    import pandas as pd
    monkeypatch.setattr(data, "TEXT", "sentence")
    monkeypatch.setattr(data, "LABEL", "category")
    frame = pd.DataFrame({"sentence": ["a b", "c"], "category": [1, 0], "text": ["not", "these"]})
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_pickle(tmp_path / "d.pkl")
    for path in (tmp_path / "d.csv", tmp_path / "d.pkl"):
        assert data.read_texts(str(path)) == (["a b", "c"], [1, 0]), path


def data_flags(path, **flags):
    """train.py's data flags, as load_splits reads them."""
    return SimpleNamespace(**{"data": path, "val_size": 640, "seed": 42, "limit": None, "label_names": None,
                              "num_labels": None, "val_data": None, **flags})


def test_splits_are_seeded_disjoint_and_the_rows_datasets_would_pick(tmp_path):
    from datasets import Dataset
    rows = [{"text": f"{r['text']} row{i}", "label": r["label"]} for i, r in enumerate(synthetic_rows(300, seed=0))]
    path = write_csv(tmp_path / "d.csv", rows)
    (tr_x, tr_y), (va_x, va_y), _ = data.load_splits(data_flags(path, val_size=50, seed=42))
    assert len(va_x) == 50 and len(tr_x) == 250
    assert set(tr_x).isdisjoint(va_x) and set(tr_x) | set(va_x) == {r["text"] for r in rows}
    label_of = {r["text"]: r["label"] for r in rows}
    assert tr_y == [label_of[t] for t in tr_x] and va_y == [label_of[t] for t in va_x]
    split = Dataset.from_list(rows).train_test_split(test_size=50, seed=42)  # the Trainer + PEFT recipe's split
    assert (tr_x, va_x) == (split["train"]["text"], split["test"]["text"])
    assert data.load_splits(data_flags(path, val_size=50, seed=7))[1][0] != va_x
    (tr_x, _), (va_x, _), _ = data.load_splits(data_flags(path, val_size=50, seed=42, limit=100))
    sample = Dataset.from_list(rows).shuffle(seed=42).select(range(100)).train_test_split(test_size=50, seed=42)
    assert (tr_x, va_x) == (sample["train"]["text"], sample["test"]["text"])


def test_batches_from_compact_tokens_are_the_batches_of_plain_lists():
    rng = random.Random(3)
    lists = [[5] * rng.randint(1, 40) for _ in range(500)]
    tokens = tokens_of(lists)
    assert data.length_grouped_batches(tokens.lengths, 16, seed=7) == \
        data.length_grouped_batches([len(x) for x in lists], 16, seed=7)
    assert data.sorted_batches(tokens.lengths, 16) == \
        [r[i:i + 16] for r in [sorted(range(500), key=lambda i: -len(lists[i]))] for i in range(0, 500, 16)]
    # Python's own seeded random: the same batches on every machine, and as before the tokens were
    # made compact (this list is what the list-based data.py of the previous release gave)
    assert data.length_grouped_batches([3, 1, 2, 5, 4, 9, 8, 7], 3, seed=0, group_batches=1) == \
        [[1, 4, 5], [7, 6], [2, 0, 3]]


# --- train.py: how we learn ------------------------------------------------------------------------

@pytest.fixture(scope="session")
def trained(model_dirs, tmp_path_factory):
    """One short real training run on the tiny RoBERTa and a learnable synthetic data set."""
    folder = tmp_path_factory.mktemp("run")
    train_csv = write_csv(folder / "train.csv", synthetic_rows(1200, seed=1))
    out = str(folder / "ckpt")
    report = io.StringIO()
    args = train.parse_args([
        "--model", model_dirs["roberta"], "--data", train_csv, "--out", out, "--r", "4", "--alpha", "8",
        "--lr", "1e-2", "--epochs", "30", "--batch-size", "32", "--val-size", "200",
        "--eval-every", "20", "--patience", "5", "--max-length", "64", "--log-every", "10",
        "--precision", "fp32", "--export-peft", str(folder / "peft")])
    with contextlib.redirect_stdout(report):
        train.start_process(args)
        model, val_acc = train.train(args)
    return {"out": out, "model": model, "val_acc": val_acc, "folder": folder, "report": report.getvalue(), "args": args,
            "peft": str(folder / "peft"), "steps_per_epoch": -(-1000 // 32)}


def test_training_learns_far_above_chance(trained):
    assert trained["val_acc"] >= 0.85  # chance is 0.25
    config = json.load(open(os.path.join(trained["out"], "config.json")))
    assert config["val_accuracy"] == trained["val_acc"] and 0 < config["val_macro_f1"] <= 1
    assert config["r"] == 4 and config["alpha"] == 8 and config["init"] == "lora"
    assert config["targets"] == [f"roberta.encoder.layer.{i}.attention.self.{t}" for i in (0, 1)
                                 for t in ("query", "value")]
    assert config["labels"] == ["0", "1", "2", "3"] and config["max_length"] == 64
    files = sorted(f for f in os.listdir(trained["out"]) if not f.endswith(".png"))  # pictures: with matplotlib
    assert files == ["adapter.safetensors", "config.json", "last_state.pt", "metrics.jsonl"]
    assert os.path.getsize(os.path.join(trained["out"], "adapter.safetensors")) < 200_000  # no full model


def test_the_run_logs_its_metrics_and_an_interval(trained):
    rows = [json.loads(line) for line in open(os.path.join(trained["out"], "metrics.jsonl"))]
    evals = [r for r in rows if "val_accuracy" in r]
    logs = [r for r in rows if "train_loss" in r]
    last_step = json.load(open(os.path.join(trained["out"], "config.json")))["step"]
    assert [r["step"] for r in evals][:3] == [20, 40, 60] and [r["step"] for r in logs][:3] == [10, 20, 30]
    assert max(r["val_accuracy"] for r in evals) == trained["val_acc"]
    assert [r for r in evals if r["val_accuracy"] == trained["val_acc"]][0]["step"] == last_step
    assert all(r["lr"] == 1e-2 and r["elapsed_s"] >= 0 and r["epoch"] == round(r["step"] / 32, 3) for r in logs)
    assert logs[-1]["train_loss"] < logs[0]["train_loss"]
    assert all(r1["elapsed_s"] <= r2["elapsed_s"] for r1, r2 in zip(rows, rows[1:]))
    assert trained["report"].count("95% bootstrap interval") == 1


def test_bootstrap_interval_brackets_the_accuracy():
    correct = torch.tensor([True] * 170 + [False] * 30)  # accuracy 0.85 on 200 rows
    low, high = train.bootstrap_interval(correct, seed=0)
    assert 0.79 < low < 0.85 < high < 0.91  # about 0.85 +- 1.96 * sqrt(0.85 * 0.15 / 200) = 0.05
    assert train.bootstrap_interval(correct, seed=0) == (low, high)


def test_early_stopping_stops_patience_evaluations_after_the_best_and_restores_it(trained):
    best_step = json.load(open(os.path.join(trained["out"], "config.json")))["step"]
    evals = [json.loads(line)["step"] for line in open(os.path.join(trained["out"], "metrics.jsonl"))
             if "val_accuracy" in line]
    assert evals[-1] == best_step + 5 * 20 < 30 * trained["steps_per_epoch"]  # patience 5, every 20 steps
    assert trained["report"].count("early stop: no better validation accuracy in 5 evaluations") == 1
    saved = load_file(os.path.join(trained["out"], "adapter.safetensors"))
    current = trained["model"].state_dict()
    assert {n for n in saved if ".lora_" not in n} == {n for n in current if n.startswith("classifier.")}
    for name, tensor in saved.items():  # the model in memory is the best one, not the last one
        torch.testing.assert_close(current[name].cpu(), tensor, rtol=0, atol=0)
    last = torch.load(os.path.join(trained["out"], "last_state.pt"), weights_only=True)["trained"]
    assert any(not torch.equal(last[n], current[n]) for n in last)  # ... which differs from the last


def test_the_final_report_is_the_restored_models_own_evaluation(trained):
    from transformers import AutoTokenizer
    args = trained["args"]  # the report reuses the best evaluation's predictions: they must be the model's
    _, (val_texts, val_labels), _ = data.load_splits(args)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    val_tokens, val_labels = data.tokenize(tokenizer, val_texts, args.max_length), torch.tensor(val_labels)
    _, figures, score = train.evaluate(trained["model"], val_tokens, val_labels, tokenizer.pad_token_id, args)
    assert score == figures["val_accuracy"] == trained["val_acc"]  # --select accuracy, the default
    assert (f"restored the best adapter: val loss {figures['val_loss']:.4f}, val accuracy {trained['val_acc']:.4f}"
            in trained["report"]) and f"macro-F1 {figures['val_macro_f1']:.4f}" in trained["report"]


def test_a_run_stops_after_patience_evaluations_without_improvement(model_dirs, tmp_path, capsys):
    train_csv = write_csv(tmp_path / "t.csv", synthetic_rows(200, seed=3))
    out = str(tmp_path / "ckpt")
    train.main(["--model", model_dirs["bert"], "--data", train_csv, "--out", out, "--lr", "1e-12",
                "--epochs", "10", "--batch-size", "16", "--val-size", "40", "--eval-every", "1", "--patience", "2",
                "--max-length", "64"])
    printed = capsys.readouterr()
    log = printed.out + printed.err
    # lr ~ 0: the first evaluation is the best and the next two do not improve on it
    assert json.load(open(os.path.join(out, "config.json")))["step"] == 1
    assert "step 3: val" in log and "step 4: val" not in log
    assert "early stop: no better validation accuracy in 2 evaluations" in log


def schedule_of(name, warmup_ratio, total_steps):
    """The rate at each step, a share of --lr, as train.make_optimizer's scheduler gives it."""
    layer = nn.Linear(2, 2)
    args = SimpleNamespace(lr=1.0, weight_decay=0.0, schedule=name, warmup_ratio=warmup_ratio,
                           device=torch.device("cpu"), amp_dtype=None)
    optimizer, scheduler, _ = train.make_optimizer(layer, args, total_steps)
    rates = []
    for _ in range(total_steps + 1):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return rates


def test_the_schedule_warms_up_from_zero_then_decays_to_zero_at_the_last_step():
    linear, cosine = schedule_of("linear", 0.1, 100), schedule_of("cosine", 0.1, 100)
    assert linear[0] == 0 and linear[5] == 0.5 and linear[10] == 1.0  # warmup: 0 -> 1 over 10 steps
    assert linear[55] == pytest.approx(0.5) and linear[100] == 0.0  # then linearly to 0 at the last step
    assert cosine[10] == 1.0 and abs(cosine[55] - 0.5) < 1e-12 and cosine[100] == 0.0
    assert set(schedule_of("constant", 0.0, 100)) == {1.0}
    constant = schedule_of("constant", 0.2, 100)  # constant warms up too, then holds
    assert constant[10] == 0.5 and set(constant[20:]) == {1.0}


def tiny_run_argv(model_dir, train_csv, out, *extra):
    return ["--model", model_dir, "--data", train_csv, "--out", out, "--lr", "1e-2", "--epochs", "3",
            "--batch-size", "16", "--val-size", "40", "--eval-every", "7", "--patience", "50",
            "--max-length", "64", "--precision", "fp32", "--seed", "5", *extra]


def test_a_run_with_a_schedule_logs_its_rate_and_resumes_exactly(model_dirs, tmp_path, capsys, on_cpu):
    import signal
    train_csv = write_csv(tmp_path / "t.csv", synthetic_rows(440, seed=4))
    argv = lambda out: tiny_run_argv(model_dirs["roberta"], train_csv, out, "--schedule", "linear",  # noqa: E731
                                     "--warmup-ratio", "0.2", "--log-every", "5")
    train.main((argv(str(tmp_path / "whole"))))
    rates = {r["step"]: r["lr"] for r in map(json.loads, open(tmp_path / "whole" / "metrics.jsonl")) if "lr" in r}
    assert rates[5] == pytest.approx(1e-2 * 5 / 15) and rates[15] == pytest.approx(1e-2)  # 75 steps, 15 warmup
    assert rates[70] == pytest.approx(1e-2 * 5 / 60) and rates[75] == 0.0
    real_step, calls = train.train_step, []

    def ctrl_c_at_step_10(*a, **k):  # as if Ctrl-C were pressed during step 10
        calls.append(1)
        if len(calls) == 10:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*a, **k)
    train.train_step = ctrl_c_at_step_10
    try:
        with pytest.raises(SystemExit) as stop:
            train.main(argv(str(tmp_path / "part")))
    finally:
        train.train_step = real_step
    assert stop.value.code == 130 and "interrupted at step 10" in capsys.readouterr().out
    train.main((argv(str(tmp_path / "part")) + ["--resume"]))
    a, b = (torch.load(tmp_path / d / "last_state.pt", weights_only=True)["trained"] for d in ("whole", "part"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_over_the_parameter_budget_is_refused_before_training(model_dirs, tmp_path, capsys):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as stop:
        train.main(["--model", model_dirs["roberta"], "--data", write_csv(tmp_path / "t.csv", synthetic_rows(60, 2)),
                    "--val-size", "10", "--max-length", "64", "--r", "4", "--max-trainable", "1500", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    # tiny RoBERTa: head 32*32+32 + 32*4+4 = 1,188; each rank costs 2 layers x 2 targets x (32+32) = 256
    assert stop.value.code == 2 and err.splitlines() == [
        "error: r=4 on query, value trains 2,212 parameters, above --max-trainable 1,500; the largest r that fits is 1"]
    assert not out.exists()


@pytest.mark.parametrize("targets,budget,rank", [(["query", "value"], 1_500, 1), (["query", "value"], 3_000, 7),
                                                  (["all-linear"], 3_000, 2)])
def test_r_auto_takes_the_largest_rank_under_the_budget_and_alpha_2r(model_dirs, tmp_path, capsys, targets, budget,
                                                                    rank):
    out = str(tmp_path / "auto")
    train.main(["--model", model_dirs["roberta"], "--data", write_csv(tmp_path / "t.csv", synthetic_rows(60, 2)),
                "--val-size", "10", "--max-length", "64", "--r", "auto", "--max-trainable", str(budget), "--out", out,
                "--max-steps", "1", "--targets", *targets])
    printed = capsys.readouterr().out
    assert f"LoRA r={rank} (--r auto: the largest under {budget:,}), alpha={2 * rank}" in printed
    trainable = int(printed.split("trainable in total")[1].split()[0].replace(",", ""))
    per_rank = 4 * 64 if targets != ["all-linear"] else 2 * (4 * 64 + 2 * (32 + 64))  # tiny: hidden 32, ffn 64
    assert trainable <= budget < trainable + per_rank  # one rank more would not fit
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["r"] == rank and config["alpha"] == 2 * rank


def test_the_best_recipe_is_one_command_that_takes_its_paths_from_the_environment(model_dirs, tmp_path):
    out, python = tmp_path / "best", tmp_path / "python"
    python.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$0.argv"\n')  # stands for python: keeps its arguments
    python.chmod(0o755)
    env = {**os.environ, "MODEL": model_dirs["roberta"], "DATA": write_csv(tmp_path / "t.csv", synthetic_rows(80, 3)),
           "OUT": str(out), "PYTHON": str(python)}
    result = subprocess.run(["bash", os.path.join(HERE, "bench", "best_recipe.sh"),
                             "--max-steps", "2", "--val-size", "16", "--max-length", "32"], env=env, capture_output=True,
                            text=True, timeout=120)  # extra flags go on to train.py (a later flag wins)
    assert result.returncode == 0, result.stderr[-2000:]
    script, *argv = (tmp_path / "python.argv").read_text().splitlines()
    assert script == "train.py"
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(argv)  # the command the script runs, here in-process
    config = json.load(open(out / "config.json"))
    # what was measured: PiSSA at r=4, alpha 8, saved as plain LoRA of rank 8, alpha 16
    assert (config["init"], config["trained_r"], config["r"], config["alpha"]) == ("pissa", 4, 8, 16.0)
    assert sorted({t.split(".layer.")[1].split(".", 1)[1] for t in config["targets"]}) == [
        "attention.output.dense", "attention.self.key", "attention.self.query", "attention.self.value"]


def tiny_step(amp_dtype, scaler=None, steps=1, max_grad_norm=1.0):
    """(losses, gradients of the first step, tensors before, after) of train_step on the tiny RoBERTa."""
    torch.manual_seed(0)
    model = tiny_model("roberta")
    inject_lora(model, 4, 8)
    model.classifier.requires_grad_(True)
    for m in adapters_of(model):
        nn.init.normal_(m.lora_B.weight, std=0.1)  # as after some training: every gradient non-zero
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    model.train()
    args = SimpleNamespace(amp_dtype=amp_dtype, max_grad_norm=max_grad_norm, lr=1e-3, weight_decay=0.01,
                           schedule="constant", warmup_ratio=0.0, device=torch.device("cpu"), ddp_world=1,
                           loss_weight=None)
    optimizer, scheduler, default_scaler = train.make_optimizer(model, args, total_steps=10)
    grads, adamw_step = {}, optimizer.step
    optimizer.step = lambda *a, **k: grads or grads.update({n: p.grad.clone() for n, p in trainable.items()}) \
        or adamw_step(*a, **k)  # the first step's gradients, unscaled, as AdamW gets them
    batch = [(torch.randint(5, 60, (8, 16)), torch.ones(8, 16, dtype=torch.long), torch.arange(8) % 4, 1 / 8)]
    losses = [train.train_step(model, batch, optimizer, scheduler, scaler or default_scaler, args).item()
              for _ in range(steps)]
    return losses, grads, before, {n: p.detach() for n, p in trainable.items()}


def cosine(a, b):
    return nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def test_max_grad_norm_clips_what_adamw_gets_and_0_clips_nothing():
    norm = lambda grads: torch.cat([g.flatten() for g in grads.values()]).norm().item()  # noqa: E731
    _, free, _, _ = tiny_step(None, max_grad_norm=0)
    _, clipped, _, _ = tiny_step(None, max_grad_norm=1e-3)
    assert norm(free) > 0.01 and norm(clipped) == pytest.approx(1e-3, rel=1e-3)
    for name in free:  # the same direction, scaled down
        assert cosine(clipped[name], free[name]) > 0.9999, name


def test_weight_decay_shrinks_matrices_only_never_biases_or_norms():
    model = tiny_model("roberta")
    inject_lora(model, 2, 4, skip=["classifier"])
    model.classifier.requires_grad_(True)
    model.roberta.encoder.layer[0].output.LayerNorm.requires_grad_(True)  # a norm, as a user might train
    args = SimpleNamespace(lr=1.0, weight_decay=0.5, schedule="constant", warmup_ratio=0.0,
                           device=torch.device("cpu"), amp_dtype=None)
    optimizer, _, _ = train.make_optimizer(model, args, total_steps=10)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trained.items()}
    for p in trained.values():
        p.grad = torch.zeros_like(p)  # no gradient: AdamW moves a tensor by its decay alone
    optimizer.step()
    for name, p in trained.items():
        expected = before[name] * 0.5 if p.dim() >= 2 else before[name]  # 1 - lr * weight decay
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7, msg=name)
    assert any(p.dim() < 2 for p in trained.values()) and any(p.dim() >= 2 for p in trained.values())
    for p in trained.values():
        p.grad = torch.ones_like(p)
    moved = {n: p.detach().clone() for n, p in trained.items()}
    optimizer.step()  # with a gradient, every trained tensor moves: none was left out of AdamW
    assert all(not torch.equal(p, moved[n]) for n, p in trained.items())


def test_a_bf16_training_step_on_cpu_moves_the_adapters_as_fp32_does():
    (fp32_loss,), fp32_grads, before, _ = tiny_step(None)
    (bf16_loss,), bf16_grads, _, after = tiny_step(torch.bfloat16)
    assert bf16_loss != fp32_loss and abs(bf16_loss - fp32_loss) < 0.02 * fp32_loss  # bf16 rounds, a little
    for name in before:
        assert torch.isfinite(after[name]).all() and not torch.equal(after[name], before[name]), name
        assert cosine(bf16_grads[name], fp32_grads[name]) > 0.99, name
        assert 0.8 < bf16_grads[name].norm() / fp32_grads[name].norm() < 1.25, name


def test_the_fp16_path_scales_the_loss_and_steps_like_fp32():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    losses, fp16_grads, before, after = tiny_step(torch.float16, scaler, steps=3)
    fp32_losses, fp32_grads, _, _ = tiny_step(None, steps=3)
    assert losses != fp32_losses and all(abs(a - b) < 0.02 * b for a, b in zip(losses, fp32_losses))
    assert scaler.get_scale() == 2.0**10  # no step was skipped for an overflow
    for name in before:
        assert not torch.equal(after[name], before[name]), name
        assert cosine(fp16_grads[name], fp32_grads[name]) > 0.99, name
        assert 0.8 < fp16_grads[name].norm() / fp32_grads[name].norm() < 1.25, name  # unscaled before AdamW


def test_compile_traces_the_step_model_without_graph_breaks_and_once_per_shape(no_dropout_model):
    from torch._dynamo.utils import counters
    model, _, new = checkpoint.load_base_model(no_dropout_model, 4)
    inject_lora(model, 2, 4, skip=new)
    ids, mask = torch.randint(5, 60, (4, 16)), torch.ones(4, 16, dtype=torch.long)
    torch._dynamo.reset()
    try:
        counters.clear()
        compiled = torch.compile(model, backend="eager", dynamic=False)
        for width in (16, 32, 16, 32):  # two buckets of 16: a graph each, none again
            compiled(input_ids=ids[:, :1].repeat(1, width), attention_mask=mask[:, :1].repeat(1, width))
        breaks = sum(counters["graph_break"].values())
        assert breaks <= 2, dict(counters["graph_break"])  # transformers' one padding check, once a width
        assert counters["stats"]["unique_graphs"] <= 2 * (breaks // 2 + 1)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("capability,expected", [((7, 5), torch.float16), ((7, 0), torch.float16),
                                                 ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_auto_precision_is_bf16_only_where_the_gpu_computes_it_natively(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what a T4 says, emulated
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    assert predict.pick_precision(torch.device("cuda"), "auto") is expected
    assert predict.pick_precision(torch.device("cuda"), "fp32") is None


@pytest.mark.parametrize("command", ["train", "predict"])
def test_bf16_on_a_gpu_that_only_emulates_it_is_refused_in_one_line(monkeypatch, tmp_path, capsys, command):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (7, 5))  # a T4
    cuda = lambda: torch.device("cuda")  # noqa: E731
    monkeypatch.setattr(train, "pick_device", cuda)
    monkeypatch.setattr(predict, "pick_device", cuda)
    with pytest.raises(SystemExit) as stop:
        if command == "train":
            train.main(["--precision", "bf16", "--out", str(tmp_path / "never")])
        else:
            predict.main([str(tmp_path / "in.csv"), "--precision", "bf16", "--out", str(tmp_path / "s.csv")])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err.splitlines() == [err] and err.startswith("error: --precision bf16: this GPU")
    assert not (tmp_path / "never").exists() and not (tmp_path / "s.csv").exists()


def test_the_torch_floor_has_every_api_the_code_names():
    floor = next(line for line in open(os.path.join(HERE, "requirements.txt")) if line.startswith("torch"))
    version = tuple(int(n) for n in floor.split(">=")[1].strip().split(".")[:2])
    assert version >= (2, 5)  # torch.OutOfMemoryError, which train.py and predict.py catch, is 2.5's
    for f in ("train.py", "predict.py"):
        assert "torch.OutOfMemoryError" in open(os.path.join(HERE, f)).read()


@pytest.mark.parametrize("device,accum,mode", [("cuda", 1, "reduce-overhead"), ("cuda", 2, "default"),
                                               ("cpu", 1, None)])
def test_compile_takes_cuda_graphs_only_where_no_piece_overwrites_the_gradients_of_another(device, accum, mode):
    args = SimpleNamespace(device=torch.device(device), grad_accum=accum, max_length=512)
    assert train.compile_options(args).get("mode") == mode
    assert torch._dynamo.config.cache_size_limit >= 512 // 16  # a graph for each width of 16


def test_a_gpu_pads_to_multiples_of_8_and_of_16_only_for_cuda_graphs(monkeypatch):
    import numpy as np
    monkeypatch.setattr(train, "to_device", lambda device, *tensors: tensors)
    tokens = data.Tokens(np.arange(100, dtype=np.int32), np.array([0, 3, 20, 37, 100]))  # lengths 3, 17, 17, 63
    for device, compile, width in (("cpu", False, 17), ("cuda", False, 24), ("cuda", True, 32)):
        args = SimpleNamespace(grad_accum=1, ddp_world=1, ddp_rank=0, max_length=64, device=torch.device(device),
                               compile=compile)
        (ids, mask, _, _), = train.micro_batches(tokens, torch.arange(4), [0, 1, 2], 0, args)
        assert ids.shape == (3, width) and mask.sum().item() == 3 + 17 + 17, (device, compile)


def test_auto_precision_on_a_cpu_is_bf16_only_with_amx(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert predict.pick_precision(torch.device("cpu")) is torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert predict.pick_precision(torch.device("cpu")) is None


def test_gradient_checkpointing_gives_the_same_gradients_with_no_input_gradient_and_no_warning(no_dropout_model):
    import warnings
    grads = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        args = train.parse_args(["--model", no_dropout_model, "--dropout", "0", "--max-length", "64"]
                                + ["--gradient-checkpointing"] * checkpointing)
        args.device, args.ddp_world, args.compile, args.ddp_rank = torch.device("cpu"), 1, False, 0
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no FutureWarning: not the API transformers deprecates
            with contextlib.redirect_stdout(io.StringIO()):
                model, _, _, _, _ = train.lora_model(args, ["a", "b", "c", "d"])
        for m in adapters_of(model):
            nn.init.normal_(m.lora_B.weight, std=0.1)
        embeddings = []
        model.get_input_embeddings().register_forward_hook(lambda m, i, out: embeddings.append(out))
        ids = torch.randint(5, 60, (6, 20))
        loss = nn.functional.cross_entropy(model(input_ids=ids).logits, torch.arange(6) % 4)
        loss.backward()
        assert not embeddings[0].requires_grad  # no backward through the frozen embeddings
        on = sum(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
        assert on >= 2 if checkpointing else on == 0  # each of the two layers, with --gradient-checkpointing
        grads[checkpointing] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads[True].keys() == grads[False].keys() and any(".lora_A" in n for n in grads[True])
    for name, grad in grads[False].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-5, atol=1e-7)


def out_of_memory_at_call(real, n):
    """`real`, except that its n-th call raises CUDA's out-of-memory error."""
    calls = []

    def wrapped(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*a, **k)
    return wrapped


def test_out_of_memory_is_one_line_after_saving_the_run_and_resume_takes_grad_accum(
        model_dirs, tmp_path, capsys, monkeypatch, on_cpu):
    train_csv = write_csv(tmp_path / "t.csv", synthetic_rows(200, seed=4))
    out = str(tmp_path / "run")
    real = train.train_step
    monkeypatch.setattr(train, "train_step", out_of_memory_at_call(real, 6))  # in step 6
    with pytest.raises(SystemExit) as stop:
        train.main(tiny_run_argv(model_dirs["roberta"], train_csv, out, "--epochs", "1"))
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 1
    assert err[-1].startswith("error: out of memory at step 6 (peak ") and sum("error" in e for e in err) == 1, err
    assert f"the run is saved in {out}: go on with --resume and one of --grad-accum 2, --gradient-checkpointing" \
        in err[-1]
    assert torch.load(os.path.join(out, "last_state.pt"), weights_only=True)["step"] == 5  # saved first
    monkeypatch.setattr(train, "train_step", real)
    train.main(tiny_run_argv(model_dirs["roberta"], train_csv, out, "--epochs", "1", "--resume",
                             "--grad-accum", "2"))
    assert "resumed from" in capsys.readouterr().out
    assert torch.load(os.path.join(out, "last_state.pt"), weights_only=True)["step"] == 10  # 160 rows / 16


def test_out_of_memory_in_an_evaluation_keeps_the_last_save_and_resume_evaluates_that_step(
        model_dirs, tmp_path, capsys, monkeypatch, on_cpu):
    train_csv = write_csv(tmp_path / "t.csv", synthetic_rows(200, seed=4))  # 10 steps: evaluated at 7 and 10
    out = str(tmp_path / "run")
    real = train.predict_logits
    monkeypatch.setattr(train, "predict_logits", out_of_memory_at_call(real, 2))  # the second evaluation
    with pytest.raises(SystemExit) as stop:
        train.main(tiny_run_argv(model_dirs["roberta"], train_csv, out, "--epochs", "1"))
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 1 and err[-1].startswith("error: out of memory evaluating step 10 (peak "), err
    assert f"the run is saved in {out} as of step 7, its last evaluation: go on with --resume" in err[-1]
    assert torch.load(os.path.join(out, "last_state.pt"), weights_only=True)["step"] == 7  # not step 10's
    monkeypatch.setattr(train, "predict_logits", real)
    train.main(tiny_run_argv(model_dirs["roberta"], train_csv, out, "--epochs", "1", "--resume"))
    evaluated = [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl")) if "val_loss" in line]
    assert evaluated == [7, 10]  # step 10 trained again, and judged this time


def test_pad_batch_rounds_up_to_a_multiple_never_past_max_length_and_changes_no_logit(model_dirs):
    import numpy as np
    tokens = data.Tokens(np.arange(5, 30, dtype=np.int32), np.array([0, 3, 8, 25]))  # lengths 3, 5, 17
    ids, mask = data.pad_batch(tokens, [0, 1], 1, multiple=16, max_length=20)
    assert ids.shape == (2, 16) and mask.sum(1).tolist() == [3, 5] and ids[0, 3:].eq(1).all()
    ids, mask = data.pad_batch(tokens, [0, 2], 1, multiple=16, max_length=20)
    assert ids.shape == (2, 20)  # 32 would pass --max-length
    assert data.pad_batch(tokens, [2], 1, multiple=16, max_length=16)[0].shape == (1, 17)  # never cut
    model = tiny_model("roberta")
    exact = data.pad_batch(tokens, [0, 1, 2], 1)
    wider = data.pad_batch(tokens, [0, 1, 2], 1, multiple=16, max_length=64)
    assert exact[0].shape[1] == 17 and wider[0].shape[1] == 32
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=wider[0], attention_mask=wider[1]).logits,
                                   model(input_ids=exact[0], attention_mask=exact[1]).logits, rtol=1e-5, atol=1e-6)


def test_a_training_step_reads_nothing_back_from_the_device():
    spec = importlib.util.spec_from_file_location("cpu_proxies", os.path.join(HERE, "bench", "cpu_proxies.py"))
    proxies = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(proxies)
    counted = proxies.step_counts()  # one step of a 12-layer model, batch 32, LoRA on query and value
    assert counted["host_syncs_a_step"] == 0, counted  # ours: the loss is read at log steps only
    assert counted["host_syncs_in_the_model"] <= 1, counted  # transformers': does the batch pad at all?
    assert counted["ops_a_step"] < 2900, counted  # 2,587 measured: a regression (more launches) shows


def test_an_epoch_of_the_dev_rows_has_few_shapes_and_little_padding_on_a_gpu():
    import re as regex
    path = os.path.join(HERE, "..", "shared", "data", "agnews_dev_train.csv")
    if not os.path.exists(path):
        pytest.skip("the dev CSV is not beside this checkout")
    with open(path, newline="", encoding="utf-8") as f:
        texts = [row["text"] for row in csv.DictReader(f)]
    # about a word-piece a word or mark, plus <s> and </s>: close to RoBERTa's counts on news text
    lengths = [min(512, len(regex.findall(r"\w+|[^\w\s]", t)) + 2) for t in texts]
    import numpy as np
    tokens = data.Tokens(np.zeros(sum(lengths), np.int32), np.concatenate([[0], np.cumsum(lengths)]))
    for epoch in range(2):
        batches = data.length_grouped_batches(tokens.lengths, 32, seed=42 + epoch)
        assert sorted(r for b in batches for r in b) == list(range(len(texts)))  # every row once
        widths = [data.pad_batch(tokens, b, 1, multiple=16, max_length=512)[0].shape[1] for b in batches]
        padding = 1 - sum(lengths) / sum(w * len(b) for w, b in zip(widths, batches))
        assert len(set(widths)) <= 16 and padding <= 0.18, (len(set(widths)), padding)


# --- predict.py: how we answer ---------------------------------------------------------------------

def test_load_model_predicts_like_the_trained_model(trained, model_dirs):
    texts = [r["text"] for r in synthetic_rows(50, seed=9)]
    model, tokenizer, config = checkpoint.load_model(trained["out"])
    assert len(adapters_of(model)) == 4  # beside their weights, as validation computed them
    ids = data.tokenize(tokenizer, texts, config["max_length"])
    cpu = torch.device("cpu")
    merged = predict.predict_logits(model, ids, tokenizer.pad_token_id, 16, cpu)
    unmerged = predict.predict_logits(trained["model"], ids, tokenizer.pad_token_id, 16, device_of(trained["model"]))
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
    one_by_one = torch.cat([predict.predict_logits(model, tokens_of([ids[i].tolist()]), tokenizer.pad_token_id, 1, cpu)
                            for i in range(len(ids))])
    torch.testing.assert_close(merged, one_by_one, rtol=1e-4, atol=1e-4)  # padding and sorting change nothing


def write_inputs(folder, rows):
    """The same rows in every input format predict.py reads."""
    import pandas as pd
    from datasets import Dataset

    frame = pd.DataFrame(rows)
    paths = {"csv": write_csv(folder / "in.csv", rows), "jsonl": str(folder / "in.jsonl"),
             "parquet": str(folder / "in.parquet"), "pkl-dataset": str(folder / "ds.pkl"),
             "pkl-dataframe": str(folder / "df.pkl")}
    frame.to_json(paths["jsonl"], orient="records", lines=True)
    frame.to_parquet(paths["parquet"])
    with open(paths["pkl-dataset"], "wb") as f:
        pickle.dump(Dataset.from_pandas(frame[["text"]]), f)  # like test.pkl: a text column only
    with open(paths["pkl-dataframe"], "wb") as f:
        pickle.dump(frame, f)
    return paths


def test_predict_writes_the_submission_from_every_input_format(trained, tmp_path, capsys):
    rows = synthetic_rows(120, seed=11)
    rows[5]["text"] = ""  # an empty text still gets a prediction
    outputs = []
    for kind, path in write_inputs(tmp_path, rows).items():
        out = str(tmp_path / f"{kind}.csv")
        predict.main([path, "--checkpoint", trained["out"], "--out", out, "--batch-size", "16"])
        table = read_submission(out)
        assert table[0] == ["ID", "Label"], kind
        assert [int(r[0]) for r in table[1:]] == list(range(120)), kind
        assert {r[1] for r in table[1:]} <= {"0", "1", "2", "3"}, kind
        outputs.append(table)
        printed = capsys.readouterr().out
        if kind != "pkl-dataset":  # files with a label column report accuracy
            accuracy = float(printed.split("accuracy ")[1].split()[0])
            assert accuracy >= 0.8, kind
    assert all(t == outputs[0] for t in outputs)  # same rows, same answers, whatever the format
    labels = [int(r[1]) for r in outputs[0][1:]]
    assert sum(p == r["label"] for p, r in zip(labels, rows)) / 120 >= 0.8


def test_precision_bf16_predicts_in_bf16_and_agrees_with_fp32(trained, tmp_path, monkeypatch):
    rows = synthetic_rows(120, seed=11)
    logits, answers = {}, {}
    real = predict.predict_logits
    for precision in ("fp32", "bf16"):
        monkeypatch.setattr(predict, "predict_logits", lambda *a, **k: logits.setdefault(precision, real(*a, **k)))
        out = str(tmp_path / f"{precision}.csv")
        predict.main([write_csv(tmp_path / "in.csv", rows), "--checkpoint", trained["out"], "--out", out,
                      "--precision", precision])
        answers[precision] = read_submission(out)
    assert not torch.equal(logits["bf16"], logits["fp32"])  # bf16 did run: it rounds...
    torch.testing.assert_close(logits["bf16"], logits["fp32"], rtol=0.05, atol=0.05)  # ...a little
    agree = sum(a == b for a, b in zip(answers["fp32"][1:], answers["bf16"][1:])) / 120
    assert agree >= 0.95  # and hardly changes an answer


def test_predict_in_bf16_computes_exactly_what_validation_computed(trained, monkeypatch):
    texts = [r["text"] for r in synthetic_rows(60, seed=12)]
    loaded, tokenizer, _ = checkpoint.load_model(trained["out"])
    tokens = data.tokenize(tokenizer, texts, 64)
    copied = []
    real = predict.to_device
    monkeypatch.setattr(predict, "to_device", lambda *a: copied.append(1) or real(*a))  # pinned, without a wait
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    answers = predict.predict_logits(loaded, tokens, tokenizer.pad_token_id, 16, cpu, bf16)
    assert len(copied) == 4  # every batch through to_device: on a GPU from pinned memory, not waiting
    validation = predict.predict_logits(trained["model"], tokens, tokenizer.pad_token_id, 16, cpu, bf16)
    assert torch.equal(answers, validation)  # the adapters beside their weights, as in validation: bit for bit


def test_the_command_line_runs_end_to_end(trained, tmp_path, monkeypatch, capsys):
    import runpy
    rows = synthetic_rows(30, seed=12)
    path = write_inputs(tmp_path, rows)["pkl-dataset"]
    out = tmp_path / "submission.csv"
    monkeypatch.chdir(tmp_path)  # run from elsewhere, the file as `python predict.py ARGS` runs it (in this process)
    monkeypatch.setattr(sys, "argv", ["predict.py", path, "--checkpoint", trained["out"], "--out", str(out)])
    runpy.run_path(os.path.join(HERE, "predict.py"), run_name="__main__")
    assert "wrote 30 predictions" in capsys.readouterr().out
    assert len(read_submission(out)) == 31


def test_the_confusion_matrix_and_class_report_of_a_known_prediction():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    predicted = torch.tensor([0, 0, 2, 1, 3, 2, 2, 3, 2, 3])
    confusion = predict.confusion_matrix(predicted, labels, 4)
    assert confusion.tolist() == [[2, 0, 1, 0], [0, 1, 0, 1], [0, 0, 3, 1], [0, 0, 0, 1]]
    lines = predict.class_report(confusion, ["World", "Sports", "Business", "Sci/Tech"]).splitlines()
    # Business: precision 3/4 (3 of the 4 called Business were), recall 3/4, F1 0.75, 4 rows
    assert lines[3].split() == ["Business", "0.7500", "0.7500", "0.7500", "4"]
    assert lines[4].split() == ["Sci/Tech", "0.3333", "1.0000", "0.5000", "1"]
    assert lines[-2].split() == ["Business", "0", "0", "3", "1"]


def test_missing_texts_and_lone_surrogates_are_predicted_with_one_warning_each(trained, tmp_path, capsys):
    rows = synthetic_rows(6, seed=3)
    path = tmp_path / "odd.jsonl"  # JSON lines carry lone surrogates as \ud800 escapes
    path.write_text("\n".join([json.dumps(rows[0]), '{"text": null}', '{"text": "w1 \\ud800 k2_0"}',
                               '{"text": "\\udfff"}', *map(json.dumps, rows[1:])]))
    out = tmp_path / "sub.csv"
    predict.main([str(path), "--checkpoint", trained["out"], "--out", str(out)])
    assert capsys.readouterr().err.splitlines() == [
        f"warning: {path}: 1 rows have no text (a missing value); each was predicted as an empty text",
        f"warning: {path}: 2 texts held lone surrogates (invalid UTF-16); each became U+FFFD",
        f"warning: {path}: some of its labels are not the checkpoint's class names (0, 1, 2, 3), so no accuracy is "
        "printed"]  # 3 rows have none
    assert [r[0] for r in read_submission(out)] == ["ID", *map(str, range(9))]
    assert data.clean_texts([None, "a\ud800b", "ok"], "x") == ["", "a\ufffdb", "ok"]


def test_long_texts_are_truncated_not_errors(trained, tmp_path):
    rows = [{"text": " ".join(["w1"] * 5000 + ["k2_0"]), "label": 2}, {"text": "k1_0 k1_1 w3", "label": 1}]
    out = tmp_path / "sub.csv"
    predict.main([write_csv(tmp_path / "long.csv", rows), "--checkpoint", trained["out"], "--out", str(out)])
    assert [r[0] for r in read_submission(out)] == ["ID", "0", "1"]


# --- checkpoint.py: everything that is not the pretrained base's -------------------------------------

class FrozenHead(nn.Module):
    """A student's own head, frozen: it never trains, whatever train.py asks of it."""

    def __init__(self, hidden, num_labels):
        super().__init__()
        self.norm, self.out = nn.LayerNorm(hidden), nn.Linear(hidden, num_labels)
        self.register_buffer("temperature", torch.tensor(2.0))

    def forward(self, features, **kwargs):
        return self.out(self.norm(features[:, 0])) / self.temperature

    def requires_grad_(self, requires_grad=True):
        return super().requires_grad_(False)


def test_a_head_replaced_in_load_base_model_and_frozen_is_saved_whole_and_predicts_as_trained(
        model_dirs, tmp_path, monkeypatch, capsys):
    real = checkpoint.load_base_model

    def with_own_head(*args, **kwargs):  # the student's edit, inside load_base_model
        model, tokenizer, new = real(*args, **kwargs)
        model.classifier = FrozenHead(model.config.hidden_size, model.config.num_labels)
        return model, tokenizer, ["classifier"]
    monkeypatch.setattr(checkpoint, "load_base_model", with_own_head)
    monkeypatch.setattr(train, "load_base_model", with_own_head)
    out = str(tmp_path / "frozen_head")
    model, _ = train.main((tiny_run_argv(model_dirs["roberta"], write_csv(
        tmp_path / "t.csv", synthetic_rows(200, seed=4)), out, "--epochs", "1")))
    assert not any(p.requires_grad for p in model.classifier.parameters())
    assert re.search(r"new for the task \(head\) +196", capsys.readouterr().out)  # new, not trained
    saved = load_file(os.path.join(out, "adapter.safetensors"))
    assert {n for n in saved if ".lora_" not in n} == {
        "classifier.norm.weight", "classifier.norm.bias", "classifier.out.weight", "classifier.out.bias",
        "classifier.temperature"}
    reloaded, tokenizer, _ = checkpoint.load_model(out)
    tokens = data.tokenize(tokenizer, [r["text"] for r in synthetic_rows(40, seed=5)], 64)
    expected, got = (predict.predict_logits(m, tokens, tokenizer.pad_token_id, 16, device_of(m))
                     for m in (model, reloaded))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_the_base_is_trained_in_fp32_whatever_dtype_its_folder_holds(tmp_path):
    folder = tmp_path / "fp16"
    save_tokenizer(folder)
    tiny_model("bert").bert.half().save_pretrained(folder)
    model, _, new = checkpoint.load_base_model(str(folder), 4)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert new == ["classifier"]
    out = str(tmp_path / "run")
    train.main(["--model", str(folder), "--data", write_csv(tmp_path / "t.csv", synthetic_rows(60, 2)), "--out", out,
                "--val-size", "10", "--max-length", "32", "--max-steps", "2", "--precision", "fp32"])
    state = torch.load(os.path.join(out, "last_state.pt"), weights_only=True)
    assert {t.dtype for t in state["trained"].values()} == {torch.float32}
    assert {s["exp_avg"].dtype for s in state["optimizer"]["state"].values()} == {torch.float32}


@pytest.fixture(scope="session")
def trained_pissa(model_dirs, tmp_path_factory):
    """A short run with --init pissa on all linear layers, exported for PEFT too."""
    folder = tmp_path_factory.mktemp("pissa")
    out = str(folder / "ckpt")
    with contextlib.redirect_stdout(io.StringIO()):
        model, _ = train.main((tiny_run_argv(model_dirs["roberta"], write_csv(
            folder / "t.csv", synthetic_rows(300, seed=6)), out, "--init", "pissa", "--targets", "all-linear",
            "--r", "2", "--lr", "5e-3", "--epochs", "1", "--export-peft", str(folder / "peft"))))
    return {"out": out, "model": model, "peft": str(folder / "peft")}


def test_a_pissa_adapter_is_saved_as_plain_lora_and_loads_as_trained(trained_pissa):
    config = json.load(open(os.path.join(trained_pissa["out"], "config.json")))
    assert (config["init"], config["trained_r"], config["r"], config["alpha"]) == ("pissa", 2, 4, 8.0)
    saved = load_file(os.path.join(trained_pissa["out"], "adapter.safetensors"))
    assert saved["roberta.encoder.layer.0.intermediate.dense.lora_A.weight"].shape == (4, 32)
    reloaded, tokenizer, _ = checkpoint.load_model(trained_pissa["out"])  # pristine W0 + plain LoRA of rank 4
    tokens = data.tokenize(tokenizer, [r["text"] for r in synthetic_rows(40, seed=5)], 64)
    expected, got = (predict.predict_logits(m, tokens, tokenizer.pad_token_id, 16, device_of(m))
                     for m in (trained_pissa["model"], reloaded))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    before, _, _ = checkpoint.load_base_model(json.load(open(os.path.join(trained_pissa["out"], "config.json")))[
        "base_model"], 4)
    assert not torch.allclose(predict.predict_logits(before, tokens, 1, 16, torch.device("cpu")), got, atol=1e-3)


def test_a_pissa_adapter_gives_the_same_logits_in_peft(trained_pissa, model_dirs):
    peft = pytest.importorskip("peft")
    base = RobertaForSequenceClassification.from_pretrained(model_dirs["roberta"])
    theirs = peft.PeftModel.from_pretrained(base, trained_pissa["peft"]).eval()
    ours, _, _ = checkpoint.load_model(trained_pissa["out"])
    ids = torch.randint(5, 60, (6, 20))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_a_pissa_run_resumes_exactly(model_dirs, tmp_path, capsys, monkeypatch, on_cpu):
    import signal
    train_csv = write_csv(tmp_path / "t.csv", synthetic_rows(300, seed=6))
    argv = lambda out: tiny_run_argv(model_dirs["roberta"], train_csv, out, "--init", "pissa", "--r", "2",  # noqa
                                     "--targets", "query", "value", "--lr", "5e-3", "--epochs", "2")
    train.main((argv(str(tmp_path / "whole"))))
    real_step, calls = train.train_step, []

    def ctrl_c_at_step_9(*a, **k):
        calls.append(1)
        if len(calls) == 9:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*a, **k)
    monkeypatch.setattr(train, "train_step", ctrl_c_at_step_9)
    with pytest.raises(SystemExit):
        train.main(argv(str(tmp_path / "part")))
    monkeypatch.setattr(train, "train_step", real_step)
    train.main((argv(str(tmp_path / "part")) + ["--resume"]))
    for name in ("adapter.safetensors",):
        a, b = (load_file(tmp_path / d / name) for d in ("whole", "part"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = (torch.load(tmp_path / d / "last_state.pt", weights_only=True) for d in ("whole", "part"))
    assert all(torch.equal(a["trained"][k], b["trained"][k]) for k in a["trained"])
    assert a["trained"]["roberta.encoder.layer.0.attention.self.query.lora_A.weight"].shape == (2, 32)  # rank r


def test_an_exported_adapter_gives_the_same_logits_in_peft(trained, model_dirs):
    peft = pytest.importorskip("peft")
    assert sorted(os.listdir(trained["peft"])) == ["adapter_config.json", "adapter_model.safetensors"]
    peft_config = json.load(open(os.path.join(trained["peft"], "adapter_config.json")))
    assert peft_config["target_modules"] == json.load(open(os.path.join(trained["out"], "config.json")))["targets"]
    assert peft_config["modules_to_save"] == ["classifier"]
    base = RobertaForSequenceClassification.from_pretrained(model_dirs["roberta"])
    theirs = peft.PeftModel.from_pretrained(base, trained["peft"]).eval()
    ours, _, _ = checkpoint.load_model(trained["out"])  # fp32, merged
    ids = torch.randint(5, 60, (6, 20))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_a_peft_adapter_predicts_here_as_it_does_in_peft(model_dirs, tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(3)
    base = RobertaForSequenceClassification.from_pretrained(model_dirs["roberta"])
    theirs = peft.get_peft_model(base, peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=8, lora_dropout=0.1,
                                                       target_modules=["query", "value"], init_lora_weights=False))
    with torch.no_grad():  # a head unlike the base model's, so that loading it shows
        for name, p in theirs.named_parameters():
            if "modules_to_save" in name:
                p.normal_(std=0.5)
    theirs.eval().save_pretrained(tmp_path / "adapter")
    ours, tokenizer, config = checkpoint.load_model(str(tmp_path / "adapter"))
    assert config["r"] == 2 and config["alpha"] == 8 and config["labels"] == ["0", "1", "2", "3"]
    texts = [r["text"] for r in synthetic_rows(40, seed=13)]
    ids, mask = data.pad_batch(data.tokenize(tokenizer, texts, 64), range(len(texts)), tokenizer.pad_token_id)
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits, expected, rtol=1e-5, atol=1e-5)
    out = tmp_path / "sub.csv"
    predict.main([write_csv(tmp_path / "in.csv", [{"text": t} for t in texts], columns=("text",)),
                  "--checkpoint", str(tmp_path / "adapter"), "--out", str(out), "--precision", "fp32"])
    assert [int(r[1]) for r in read_submission(out)[1:]] == expected.argmax(-1).tolist()


# --- any sequence classifier on the hub: seven families, each saved as a hub checkpoint is ----------

def family_config(family, vocab_size):
    """A tiny config of the family: 2 layers (3 for ModernBERT: one local-attention layer)."""
    from transformers import (DebertaV2Config, DistilBertConfig, LlamaConfig, ModernBertConfig, Qwen2Config)
    shared = dict(vocab_size=vocab_size, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=128, num_hidden_layers=2)
    decoder = dict(num_key_value_heads=1, bos_token_id=0, eos_token_id=2)
    return {"bert": lambda: tiny_config("bert", vocab_size),
            "roberta": lambda: tiny_config("roberta", vocab_size),
            "distilbert": lambda: DistilBertConfig(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=2,
                                                   hidden_dim=64, max_position_embeddings=128, pad_token_id=1),
            "deberta-v2": lambda: DebertaV2Config(**shared, pad_token_id=1, relative_attention=True,
                                                  position_buckets=16, pos_att_type=["p2c", "c2p"]),
            "modernbert": lambda: ModernBertConfig(**{**shared, "num_hidden_layers": 3}, pad_token_id=1,
                                                   bos_token_id=0, eos_token_id=2, cls_token_id=0, sep_token_id=2,
                                                   local_attention=4, global_attn_every_n_layers=2),
            "llama": lambda: LlamaConfig(**shared, **decoder),
            "qwen2": lambda: Qwen2Config(**shared, **decoder)}[family]()


# the adapted layers each family's default targets must give: query and value, or the fused qkv
FAMILY_TARGETS = {"bert": ["attention.self.query", "attention.self.value"],
                  "roberta": ["attention.self.query", "attention.self.value"],
                  "distilbert": ["attention.q_lin", "attention.v_lin"],
                  "deberta-v2": ["attention.self.query_proj", "attention.self.value_proj"],
                  "modernbert": ["attn.Wqkv"],
                  "llama": ["self_attn.q_proj", "self_attn.v_proj"], "qwen2": ["self_attn.q_proj", "self_attn.v_proj"]}


def save_bpe_tokenizer(folder):
    """A byte-level BPE tokenizer trained on this file's words, with Qwen's end-of-text token as its pad token."""
    from tokenizers import decoders, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator([" ".join(FILLER + [w for ws in KEYWORDS for w in ws])], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                            model_max_length=128).save_pretrained(folder)
    return tok.get_vocab_size()


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """A folder per family as the hub holds it: encoders saved *ForMaskedLM, decoders *ForCausalLM; Llama's tokenizer
    without a pad token (as Llama's own has none), Qwen2's a byte-level BPE (transformers reads it as Qwen2's)."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM
    dirs = {}
    for family in FAMILY_TARGETS:
        folder = tmp_path_factory.mktemp(family)
        if family == "qwen2":
            vocab_size = save_bpe_tokenizer(folder)
        else:
            save_tokenizer(folder)
            vocab_size = len(SPECIALS) + len(FILLER) + 20
        if family == "llama":  # no pad token, as Llama's tokenizer has none
            config_path = folder / "tokenizer_config.json"
            config = json.loads(config_path.read_text())
            config.pop("pad_token")
            config_path.write_text(json.dumps(config))
        torch.manual_seed(0)
        kind = AutoModelForCausalLM if family in ("llama", "qwen2") else AutoModelForMaskedLM
        kind.from_config(family_config(family, vocab_size)).save_pretrained(folder)
        dirs[family] = str(folder)
    return dirs


@pytest.mark.parametrize("family", list(FAMILY_TARGETS))
def test_every_family_trains_on_its_query_and_value_and_padding_changes_no_answer(family_dirs, tmp_path, capsys,
                                                                                  family):
    rows = synthetic_rows(48, seed=21)
    out, peft_dir = tmp_path / "run", tmp_path / "peft"
    train.main(["--model", family_dirs[family], "--data", write_csv(tmp_path / "t.csv", rows), "--out", str(out),
                "--val-size", "16", "--max-steps", "3", "--batch-size", "8", "--max-length", "64", "--lr", "5e-2",
                "--r", "auto", "--max-trainable", "5000", "--export-peft", str(peft_dir), "--precision", "fp32"])
    printed = capsys.readouterr().out
    config = json.load(open(out / "config.json"))
    layer = lambda path: re.sub(r".*\.\d+\.", "", path)  # noqa: E731  (the path after its layer number)
    assert sorted({layer(t) for t in config["targets"]}) == FAMILY_TARGETS[family]
    per_layer = len(FAMILY_TARGETS[family])
    assert len(config["targets"]) == per_layer * (3 if family == "modernbert" else 2)  # every layer, nothing else
    model, tokenizer, _ = checkpoint.load_model(str(out))
    per_rank = sum(m.base.in_features + m.base.out_features for m in adapters_of(model))
    trainable = int(printed.split("trainable in total")[1].split()[0].replace(",", ""))
    assert trainable <= 5000 < trainable + per_rank  # --r auto: the largest rank under the budget
    # padding never changes an answer: one text at a time (no padding) against batches of 64, padded
    texts = [r["text"] for r in synthetic_rows(30, seed=22)]
    tokens = data.tokenize(tokenizer, texts, 64)
    assert len(set(tokens.lengths.tolist())) > 10  # the batch of 64 pads most rows
    alone = predict.predict_logits(model, tokens, tokenizer.pad_token_id, 1, torch.device("cpu"))
    padded = predict.predict_logits(model, tokens, tokenizer.pad_token_id, 64, torch.device("cpu"))
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-5)
    assert alone.std(0).min() > 1e-4  # the answers differ from text to text: the check means something
    written = tmp_path / "sub.csv"
    predict.main([write_csv(tmp_path / "in.csv", [{"text": t} for t in texts], columns=("text",)),
                  "--checkpoint", str(out), "--out", str(written), "--batch-size", "64", "--precision", "fp32"])
    assert [int(r[1]) for r in read_submission(written)[1:]] == alone.argmax(-1).tolist()
    # the PEFT export predicts the same in PEFT itself, and read back here
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification
    base = AutoModelForSequenceClassification.from_pretrained(family_dirs[family], num_labels=4)
    base.config.pad_token_id = tokenizer.pad_token_id
    theirs = peft.PeftModel.from_pretrained(base, str(peft_dir)).eval()
    ids, mask = data.pad_batch(tokens, list(range(len(texts))), tokenizer.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids, attention_mask=mask).logits, alone, rtol=1e-4, atol=1e-5)
    imported, _, _ = checkpoint.load_model(str(peft_dir))
    torch.testing.assert_close(predict.predict_logits(imported, tokens, tokenizer.pad_token_id, 64,
                                                      torch.device("cpu")), alone, rtol=1e-4, atol=1e-5)


def test_a_budget_refused_names_the_layers_the_family_adapts(family_dirs, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(["--model", family_dirs["llama"], "--data", write_csv(tmp_path / "t.csv", synthetic_rows(40, 1)),
                    "--val-size", "8", "--max-trainable", "100", "--max-length", "64", "--out", str(tmp_path / "never")])
    assert capsys.readouterr().err.strip().startswith("error: r=2 on q_proj, v_proj trains ")


# --- after training: a merged model, names and probabilities, a validation file, imbalance, what LoRA learned --

NEWS = ["World", "Sports", "Business", "Sci/Tech"]


@pytest.fixture
def named(trained, tmp_path):
    """The trained checkpoint, its four classes named as AG News' are."""
    folder = tmp_path / "named"
    shutil.copytree(trained["out"], folder)
    config = json.load(open(folder / "config.json"))
    json.dump({**config, "labels": NEWS}, open(folder / "config.json", "w"))
    return str(folder)


def test_a_merged_export_loads_in_pipeline_with_its_class_names_and_predicts_what_predict_writes(named, tmp_path):
    from transformers import AutoModelForSequenceClassification, pipeline
    merged = str(tmp_path / "merged")
    predict.main(["--checkpoint", named, "--export-merged", merged])
    rows = synthetic_rows(40, seed=31)
    written = tmp_path / "sub.csv"
    predict.main([write_csv(tmp_path / "in.csv", rows), "--checkpoint", named, "--out", str(written),
                  "--precision", "fp32"])
    labels = [r[1] for r in read_submission(written)[1:]]
    answers = pipeline("text-classification", model=merged, device="cpu")([r["text"] for r in rows], batch_size=8)
    assert [a["label"] for a in answers] == labels and set(labels) > {"World"}  # names, as predict.py writes them
    model = AutoModelForSequenceClassification.from_pretrained(merged)  # no code of ours, no adapter left
    assert model.config.id2label == dict(enumerate(NEWS)) and not adapters_of(model)
    ours, tokenizer, _ = checkpoint.load_model(named)
    tokens = data.tokenize(tokenizer, [r["text"] for r in rows], 64)
    cpu = torch.device("cpu")
    torch.testing.assert_close(predict.predict_logits(model, tokens, tokenizer.pad_token_id, 8, cpu),
                               predict.predict_logits(ours, tokens, tokenizer.pad_token_id, 8, cpu), rtol=1e-4, atol=1e-5)
    checkpoint.export_peft(named, str(tmp_path / "peft"))  # the PEFT export carries the names, and reads them back
    assert checkpoint.load_model(str(tmp_path / "peft"))[2]["labels"] == NEWS


def test_probs_give_a_column_per_class_summing_to_1_and_text_prints_a_name_and_a_probability(named, tmp_path,
                                                                                             capsys, monkeypatch):
    rows = synthetic_rows(30, seed=32)
    written = tmp_path / "sub.csv"
    predict.main([write_csv(tmp_path / "in.csv", rows), "--checkpoint", named, "--out", str(written), "--probs",
                  "--precision", "fp32"])
    header, *lines = read_submission(written)
    assert header == ["ID", "Label", *NEWS] and [int(r[0]) for r in lines] == list(range(30))
    for r in lines:
        shares = [float(p) for p in r[2:]]
        assert abs(sum(shares) - 1) < 1e-5 and r[1] == NEWS[max(range(4), key=shares.__getitem__)]
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    predict.main(["--checkpoint", named, "--text", "k1_0 w3 k1_2 k1_4", "--text", "w1\nk3_3"])
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and printed[0].split("\t")[0] in NEWS and printed[1].endswith("w1\\nk3_3")
    assert 0.25 <= float(printed[0].split("\t")[1]) <= 1 and sorted(os.listdir(tmp_path)) == ["in.csv", "named", "sub.csv"]


def test_val_data_is_the_validation_split_whole_and_a_label_outside_the_classes_is_one_line(model_dirs, tmp_path,
                                                                                            capsys):
    train_csv = write_csv(tmp_path / "t.csv", synthetic_rows(120, seed=33))
    val_csv = write_csv(tmp_path / "v.csv", synthetic_rows(30, seed=34))
    argv = ["--model", model_dirs["roberta"], "--data", train_csv, "--out", str(tmp_path / "run"), "--max-length",
            "64", "--batch-size", "16", "--precision", "fp32"]
    train.main(argv + ["--val-data", val_csv])
    printed = capsys.readouterr().out
    assert "8 steps on cpu" in printed and ", 30 rows)" in printed  # all 120 rows train; the file's 30 validate
    resumed = [*argv[:5], str(tmp_path / "resumed"), *argv[6:], "--val-data", val_csv, "--eval-every", "2"]
    train.main(resumed + ["--max-steps", "4"])
    capsys.readouterr()
    train.main(resumed + ["--max-steps", "6", "--resume"])  # its best holds the file's 30 rows' classes
    assert re.search(r"resumed from \S+ at step 4 \(best val accuracy: 0\.\d{4}\)", capsys.readouterr().out)
    write_csv(tmp_path / "v.csv", synthetic_rows(31, seed=34))  # the file changed: its best is not this split's
    with pytest.raises(SystemExit) as stop:
        train.main(resumed + ["--max-steps", "8", "--resume"])
    assert stop.value.code == 2 and "(best)" in capsys.readouterr().err
    bad = [*synthetic_rows(3, seed=35), {"text": "w1", "label": 7}]
    with pytest.raises(SystemExit) as stop:
        train.main(argv + ["--val-data", write_csv(tmp_path / "bad.csv", bad)])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err.splitlines() == [err]
    assert "row 3 has label 7" in err and "--val-data takes the classes of" in err


def test_balanced_class_weights_are_n_over_k_counts_and_weigh_the_loss():
    labels = torch.tensor([0] * 95 + [1] * 5)
    args = SimpleNamespace(class_weights=["balanced"], device=torch.device("cpu"))
    torch.testing.assert_close(train.class_weights(labels, 3, args), torch.tensor([100 / 285, 100 / 15, 1.0]))
    args.class_weights = ["1", "3"]
    assert train.class_weights(labels, 2, args).tolist() == [1.0, 3.0]
    with pytest.raises(data.InputError, match="2 weights for 3 classes"):
        train.class_weights(labels, 3, args)
    torch.manual_seed(0)
    model = tiny_model("roberta", num_labels=2).train()
    ids, y = torch.randint(5, 60, (6, 12)), torch.tensor([0, 0, 0, 0, 1, 1])
    step = SimpleNamespace(amp_dtype=None, max_grad_norm=0, lr=0.0, weight_decay=0.0, schedule="constant",
                           warmup_ratio=0.0, device=torch.device("cpu"), ddp_world=1, loss_weight=torch.tensor([0.5, 4.0]))
    optimizer, scheduler, scaler = train.make_optimizer(model, step, total_steps=2)
    torch.manual_seed(1)
    loss = train.train_step(model, [(ids, torch.ones_like(ids), y, 1 / 6)], optimizer, scheduler, scaler, step)
    torch.manual_seed(1)
    each = nn.functional.cross_entropy(model(input_ids=ids).logits, y, reduction="none")
    assert loss.item() == pytest.approx((each * step.loss_weight[y]).sum().item() / 6, rel=1e-5)


def test_select_macro_f1_keeps_another_adapter_than_accuracy_on_a_95_5_split(model_dirs, tmp_path, monkeypatch):
    val = [{"text": f"w{i}", "label": int(i >= 38)} for i in range(40)]  # 38 of class 0, 2 of class 1
    train_csv = write_csv(tmp_path / "t.csv", [{"text": f"w{i % 40}", "label": int(i % 20 == 0)} for i in range(80)])
    val_csv = write_csv(tmp_path / "v.csv", val)
    scripted = [[0] * 40, [0] * 35 + [1] * 5, [0] * 40]  # the majority; the minority found, 3 rows lost; again

    def predict_logits(model, tokens, *a, **k):
        answers = torch.tensor(scripted[len(calls)])
        calls.append(1)
        return nn.functional.one_hot(answers, 2).float() * 4
    monkeypatch.setattr(train, "predict_logits", predict_logits)
    kept = {}
    for select in ("accuracy", "macro-f1"):
        calls, out = [], tmp_path / select
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            train.main(["--model", model_dirs["roberta"], "--data", train_csv, "--val-data", val_csv, "--out",
                        str(out), "--max-steps", "3", "--eval-every", "1", "--patience", "1", "--max-length", "16",
                        "--select", select])
        kept[select] = json.load(open(out / "config.json"))["step"]
        figures = [json.loads(line) for line in open(out / "metrics.jsonl") if "val_loss" in line]
        assert [round(f["val_accuracy"], 3) for f in figures][:2] == [0.95, 0.925]  # both figures, each evaluation
        assert [round(f["val_macro_f1"], 3) for f in figures][:2] == [0.487, 0.765]
        stopped = {"accuracy": 2, "macro-f1": 3}[select]  # a figure no better than the best: patience 1 ends it
        assert len(figures) == stopped and f"early stop: no better validation {select} in 1 " in printed.getvalue()
        assert ("val macro-F1 0.7652 (best so far, saved)" in printed.getvalue()) == (select == "macro-f1")
    assert kept == {"accuracy": 1, "macro-f1": 2}


def test_what_lora_learned_is_the_spectrum_of_dw_and_how_much_it_amplifies_w0():
    from lora import what_lora_learned
    torch.manual_seed(0)
    plain, pissa = LoRALinear(nn.Linear(24, 16), r=3, alpha=6), PiSSALinear(nn.Linear(24, 16), r=3, alpha=6)
    pretrained = pissa.base.weight + pissa.scale * pissa.B0 @ pissa.A0
    for layer in (plain, pissa):
        nn.init.normal_(layer.lora_B.weight, std=0.3)
    layers = what_lora_learned(nn.Sequential(plain, pissa))
    for (path, ratio, values, amplification), W0 in zip(layers, (plain.base.weight, pretrained)):
        A, B = plain.lora_A.weight, plain.lora_B.weight  # the update, as its checkpoint holds it
        if path == "1":
            A, B = pissa.as_plain_lora()
        dW = 2.0 * B @ A
        U, S, Vh = torch.linalg.svd(dW)
        rank = 3  # PiSSA saves rank 2r; only B moved, so its update holds r directions too
        assert len(values) == rank and torch.allclose(torch.tensor(values), S[:rank], atol=1e-5)
        assert ratio == pytest.approx((dW.norm() / W0.norm()).item(), rel=1e-4)
        shared = U[:, :rank].T @ W0 @ Vh[:rank].T  # Hu et al.: |dW| / |U^T W V^T|
        assert amplification == pytest.approx((dW.norm() / shared.norm()).item(), rel=1e-3)


def test_the_spectrum_picture_names_each_adapted_layer(tmp_path):
    pytest.importorskip("matplotlib")  # not installed by CI: the picture is optional
    layers = [(f"roberta.encoder.layer.{i}.attention.self.{t}", 0.1, [2.0, 0.5], 3.0) for i in range(2)
              for t in ("query", "value")]
    path = train.plot_spectrum(layers, str(tmp_path / "adapter_spectrum.png"))
    assert path and open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert train.layer_and_name(layers[3][0]) == "1 value" and train.layer_and_name("classifier") == "classifier"


def test_the_report_says_what_lora_learned_per_adapted_layer(trained):
    lines = trained["report"].split("what LoRA learned")[1].splitlines()[1:5]
    assert [line.split()[0] for line in lines] == [f"roberta.encoder.layer.{i}.attention.self.{t}" for i in (0, 1)
                                                   for t in ("query", "value")]
    for line in lines:  # |dW| / |W0|, the amplification, at most r = 4 singular values, largest first
        ratio, amplification, *values = line.split()[1:]
        assert 0 < float(ratio) < math.inf and float(amplification.lstrip("x")) > 0 and 1 <= len(values) <= 4
        assert [float(v) for v in values] == sorted((float(v) for v in values), reverse=True)


def test_export_merged_replaces_only_a_folder_it_wrote_and_none_the_command_uses(named, model_dirs, tmp_path,
                                                                                capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    (mine / "notes.txt").write_text("a user's")
    base = json.load(open(os.path.join(named, "config.json")))["base_model"]
    files = lambda folder: {p: p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}  # noqa: E731
    for target, phrase in ((named, "reads or writes"), (base, "reads or writes"), (mine, "not a merged model"),
                           (tmp_path / "no" / "merged", "its folder does not exist")):
        before = files(target) if os.path.exists(target) else None
        with pytest.raises(SystemExit) as stop:
            predict.main(["--checkpoint", named, "--export-merged", str(target)])
        err = capsys.readouterr().err.strip()
        assert stop.value.code == 2 and err.splitlines() == [err] and phrase in err, err
        assert before is None or files(target) == before  # nothing of it touched
    with pytest.raises(SystemExit) as stop:  # train.py: refused before it trains
        train.main(["--model", model_dirs["roberta"], "--data", write_csv(tmp_path / "t.csv", synthetic_rows(40, 1)),
                    "--out", str(tmp_path / "run"), "--export-merged", str(tmp_path / "run")])
    assert stop.value.code == 2 and "reads or writes" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    for _ in range(2):  # a folder export_merged wrote is replaced whole, and readable by others
        predict.main(["--checkpoint", named, "--export-merged", str(tmp_path / "merged")])
    assert oct((tmp_path / "merged").stat().st_mode & 0o777) != oct(0o700) and not list(tmp_path.glob(".merged-*"))


def test_a_base_config_that_asks_for_an_attention_kernel_gets_sdpa_and_nothing_fetched(model_dirs, tmp_path, capfd):
    copy = tmp_path / "base"
    shutil.copytree(model_dirs["roberta"], copy)
    edit_json("config.json", attn_implementation="attacker/evil-kernel")(copy)
    model, _, _ = checkpoint.load_base_model(str(copy), 4)
    assert model.config._attn_implementation == "sdpa"  # what the model has, not what the file asks
    assert "evil-kernel" not in "".join(capfd.readouterr())


def test_empty_texts_are_answered_with_a_tokenizer_that_adds_no_token(family_dirs):
    model, tokenizer, _ = checkpoint.load_base_model(family_dirs["qwen2"], 4)  # Qwen's BPE: "" is no token
    tokens = data.tokenize(tokenizer, ["", "k1_0 w3", ""], 32)
    assert tokens.lengths.tolist()[0] == 0
    for batch_size in (1, 3):
        logits = predict.predict_logits(model, tokens, tokenizer.pad_token_id, batch_size, torch.device("cpu"))
        assert logits.shape == (3, 4) and torch.isfinite(logits).all()


def test_a_tokenizer_whose_regex_panics_is_one_line(valid, tmp_path, capsys):
    folder = tmp_path / "ck"
    shutil.copytree(valid["ours"], folder)
    base_folder(base_tokenizer_edit(lambda t: t.update(pre_tokenizer={
        "type": "Split", "pattern": {"Regex": "(w|w)*$"}, "behavior": "Isolated", "invert": False})))[1](folder)
    with pytest.raises(SystemExit) as stop:
        predict.main(["--checkpoint", str(folder), "--text", "w" * 40 + "!"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err.splitlines() == [err] and err.startswith("error: the tokenizer failed")


def test_a_base_named_on_the_hub_is_checked_once_downloaded_before_it_is_built(valid, tmp_path, monkeypatch):
    import huggingface_hub
    snapshot = tmp_path / "hub" / "models--evil--huge" / "snapshots" / ("0" * 40)
    shutil.copytree(json.load(open(os.path.join(valid["ours"], "config.json")))["base_model"], snapshot)
    (tmp_path / "hub" / "models--evil--huge" / "refs").mkdir()
    (tmp_path / "hub" / "models--evil--huge" / "refs" / "main").write_text("0" * 40)
    edit_json("config.json", num_hidden_layers=24, hidden_size=2048, intermediate_size=8192,
              num_attention_heads=16)(snapshot)  # 1.2 billion parameters, in a folder of 100 KB
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    folder = tmp_path / "ck"
    shutil.copytree(valid["ours"], folder)
    edit_json("config.json", base_model="evil/huge")(folder)
    with pytest.raises(data.InputError, match="describes a model of 1,2"):
        checkpoint.load_model(str(folder))


# --- operations: nothing lost, nothing let in, torchrun ------------------------------------------------

def test_ctrl_c_then_resume_ends_exactly_like_an_uninterrupted_run(model_dirs, tmp_path, capsys, monkeypatch,
                                                                  on_cpu):
    import signal
    train_csv = write_csv(tmp_path / "t.csv", synthetic_rows(440, seed=4))
    whole = str(tmp_path / "whole")
    _, whole_acc = train.main((tiny_run_argv(model_dirs["roberta"], train_csv, whole)))
    capsys.readouterr()

    # the same run, sent SIGINT (what Ctrl-C sends) during its 8th step, part way through the first epoch
    part = str(tmp_path / "part")
    argv = tiny_run_argv(model_dirs["roberta"], train_csv, part)
    real_step, steps, handler = train.train_step, [], signal.getsignal(signal.SIGINT)

    def step(*a, **k):
        steps.append(1)
        if len(steps) == 8:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*a, **k)
    monkeypatch.setattr(train, "train_step", step)
    try:
        with pytest.raises(SystemExit) as stop:
            train.main(argv)
    finally:
        signal.signal(signal.SIGINT, handler)
    monkeypatch.undo()
    rest = capsys.readouterr().out
    assert stop.value.code == 130 and "interrupted at step 8; " in rest, rest
    assert "Resume with:" in rest and "--resume" in rest.splitlines()[-1]
    stopped_at = torch.load(os.path.join(part, "last_state.pt"), weights_only=True)["step"]
    assert stopped_at == 8  # 25 steps an epoch, 3 epochs: saved between two steps

    _, resumed_acc = train.main((argv + ["--resume"]))
    assert f"resumed from {part} at step {stopped_at}" in capsys.readouterr().out
    assert resumed_acc == whole_acc
    a, b = (load_file(os.path.join(d, "adapter.safetensors")) for d in (whole, part))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = (torch.load(os.path.join(d, "last_state.pt"), weights_only=True)["trained"] for d in (whole, part))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    whole_cfg, part_cfg = (json.load(open(os.path.join(d, "config.json"))) for d in (whole, part))
    assert whole_cfg == {**part_cfg, "base_model": whole_cfg["base_model"]}


def test_resume_refuses_other_flags_and_missing_state(model_dirs, tmp_path, capsys):
    train_csv = write_csv(tmp_path / "t.csv", synthetic_rows(200, seed=4))
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit) as stop:
        train.main(tiny_run_argv(model_dirs["bert"], train_csv, out, "--resume"))
    assert stop.value.code == 2 and "no saved training state to resume" in capsys.readouterr().err
    train.main(tiny_run_argv(model_dirs["bert"], train_csv, out, "--epochs", "1"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        train.main(tiny_run_argv(model_dirs["bert"], train_csv, out, "--epochs", "1", "--lr", "5e-3", "--resume"))
    assert stop.value.code == 2 and "--lr was 0.01, now 0.005" in capsys.readouterr().err
    state = torch.load(os.path.join(out, "last_state.pt"), weights_only=True)
    torch.save({**state, "format": 1}, os.path.join(out, "last_state.pt"))  # as an older train.py wrote it
    with pytest.raises(SystemExit) as stop:
        train.main(tiny_run_argv(model_dirs["bert"], train_csv, out, "--epochs", "1", "--resume"))
    assert stop.value.code == 2 and "written by another version of train.py" in capsys.readouterr().err


def test_a_diverging_run_stops_with_a_clear_message_and_keeps_the_best_adapter(model_dirs, tmp_path, capsys):
    train_csv = write_csv(tmp_path / "t.csv", synthetic_rows(300, seed=4))
    out = str(tmp_path / "run")
    argv = ["--model", model_dirs["roberta"], "--data", train_csv, "--out", out, "--batch-size", "16",
            "--val-size", "40", "--eval-every", "2", "--max-length", "64", "--precision", "fp32",
            "--max-grad-norm", "0", "--log-every", "3", "--epochs", "5"]
    train.main(argv + ["--lr", "1e-3", "--epochs", "1"])  # a sane first run leaves a best adapter
    best = open(os.path.join(out, "adapter.safetensors"), "rb").read()
    assert all(torch.isfinite(t).all() for t in load_file(os.path.join(out, "adapter.safetensors")).values())
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        train.main(argv + ["--lr", "1e30", "--log-every", "1"])  # the loss is checked after every step
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 1
    assert err.startswith("error: the training loss became nan by step 2; lower --lr (now 1e+30)")
    assert err.endswith("no evaluation has kept an adapter yet")  # the file there is the first run's, not this one's
    # the diverged model never replaced the good adapter: the file is byte for byte the first run's
    assert open(os.path.join(out, "adapter.safetensors"), "rb").read() == best


def checkpoint_variant(trained, tmp_path, name, edit_config=None, edit_tensors=None, adapter_bytes=None):
    folder = tmp_path / name
    shutil.copytree(trained["out"], folder)
    if edit_config:
        config = json.load(open(folder / "config.json"))
        edit_config(config)
        json.dump(config, open(folder / "config.json", "w"))
    if edit_tensors:
        tensors = load_file(folder / "adapter.safetensors")
        edit_tensors(tensors)
        save_file(tensors, folder / "adapter.safetensors")
    if adapter_bytes is not None:
        (folder / "adapter.safetensors").write_bytes(adapter_bytes)
    return str(folder)


BAD_PREDICTIONS = {  # name: (how to make the input or the checkpoint, what the one line says)
    "no such file": (lambda d, v: [str(d / "missing.csv")], "No such file"),
    "unknown kind": (lambda d, v: [write_csv(d / "x.txt", [])], "unknown kind of input"),
    "no text column": (lambda d, v: [write_csv(d / "nocol.csv", [{"body": "a"}], columns=("body",))],
                       "no `text` column (columns: body)"),
    "no rows": (lambda d, v: [write_csv(d / "empty.csv", [])], "no rows"),
    "a newline in the file's name": (lambda d, v: [str((d / "a\nb.pkl").write_bytes(b"garbage") and d / "a\nb.pkl")],
                                     "a\\nb.pkl: not read"),
    "a number for a text": (lambda d, v: [str((d / "n.jsonl").write_text('{"text": "w1"}\n{"text": 7}\n') and
                                              d / "n.jsonl")], "row 1 has text 7, not a string"),
    "not a checkpoint": (lambda d, v: ["--checkpoint", str(d / "nowhere")], "not a checkpoint folder"),
    "garbled adapter": (lambda d, v: ["--checkpoint", v("garbled", adapter_bytes=b"\x00garbage")],
                        "not a safetensors file"),
    "config without r": (lambda d, v: ["--checkpoint", v("badjson", edit_config=lambda c: c.pop("r"))],
                         "lacks `r`, an integer from 1 to 4096"),
    "another r": (lambda d, v: ["--checkpoint", v("other_r", edit_config=lambda c: c.update(r=8))], "does not fit"),
    "other targets": (lambda d, v: ["--checkpoint", v("other_targets", edit_config=lambda c: c.update(
        targets=["query", "key"]))], "it lacks roberta.encoder.layer.0.attention.self.key.lora_A.weight"),
    "other labels": (lambda d, v: ["--checkpoint", v("other_labels", edit_config=lambda c: c.update(
        labels=["a", "b", "c"]))], "classifier.out_proj.bias does not fit"),
    "no head in it": (lambda d, v: ["--checkpoint", v("headless", edit_tensors=lambda t: t.pop(
        "classifier.out_proj.weight"))], "it lacks classifier.out_proj.weight"),
    "a target it lacks": (lambda d, v: ["--checkpoint", v("no_key", edit_config=lambda c: c.update(
        targets=c["targets"] + ["nothing.here"]))], "of its targets are not layers of"),
    "batch size 0": (lambda d, v: ["--batch-size", "0"], "--batch-size must be at least 1"),
}


@pytest.mark.parametrize("case", BAD_PREDICTIONS)
def test_bad_prediction_inputs_and_checkpoints_are_one_line_and_exit_2(trained, tmp_path, capsys, case):
    make, message = BAD_PREDICTIONS[case]
    argv = make(tmp_path, lambda name, **kw: checkpoint_variant(trained, tmp_path, name, **kw))
    if argv[0].startswith("--"):
        argv = [write_csv(tmp_path / "ok.csv", synthetic_rows(3, 0))] + argv
    if "--checkpoint" not in argv:
        argv += ["--checkpoint", trained["out"]]
    out = tmp_path / "never.csv"
    with pytest.raises(SystemExit) as stop:
        predict.main(argv + ["--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2
    assert message in err and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert not out.exists()


BAD_TRAINING = {  # name: (flags, what the one line says)
    "a label outside 0..K-1": (lambda d, rows: ["--data", write_csv(d / "l.csv", rows[:10] + [
        {"text": "w1", "label": 7}] + rows[10:]), "--num-labels", "4"], "has label 7, outside 0..3"),
    "no label column": (lambda d, rows: ["--data", write_csv(d / "n.csv", rows, columns=("text",))],
                        "no `label` column"),
    "a missing text": (lambda d, rows: ["--data", str((d / "m.jsonl").write_text("\n".join(json.dumps(r) for r in (
        rows[:5] + [{"text": None, "label": 1}] + rows[5:]))) and d / "m.jsonl")],
        "row 5 has no text (a missing value); fill it in"),
    "labels 1 and 7": (lambda d, rows: ["--data", write_csv(d / "17.csv", [{**r, "label": 1 + 6 * (r["label"] % 2)}
                                                                            for r in rows])],
                       "labels must be the integers 0..K-1, found 2 distinct: 1, 7; map them to 0..K-1 (AG News' "
                       "original CSV numbers its classes 1-4: subtract 1)"),
    "an unknown hub dataset": (lambda d, rows: ["--data", "no_such_hub_dataset"],
                               "cannot load the dataset 'no_such_hub_dataset' from the Hugging Face hub"),
    "the hub, offline": (lambda d, rows: ["--model", "roberta-base"],
                         "offline a local model folder (--model DIR) with HF_HUB_OFFLINE=1"),
    "r 0": (lambda d, rows: ["--r", "0"], "argument --r: must be at least 1, got 0"),
    "r neither a number nor auto": (lambda d, rows: ["--r", "big"], "argument --r: takes a whole number or auto, not 'big'"),
    "r auto without a budget": (lambda d, rows: ["--r", "auto"], "--r auto needs --max-trainable N"),
    "a negative lr": (lambda d, rows: ["--lr", "-0.001"], "argument --lr: must be positive, got -0.001"),
    "val size too big": (lambda d, rows: ["--val-size", "60"],
                         "--val-size 60 must be below the 60 rows used"),
    "an unknown target": (lambda d, rows: ["--targets", "query", "qkv"], "unknown LoRA target(s) qkv; targets are "
                          "dotted suffixes of this model's Linear layers: attention.output.dense, "
                          "attention.self.key"),
    "an unknown init": (lambda d, rows: ["--init", "gaussian"], "argument --init: invalid choice: 'gaussian'"),
    "max length above the model's": (lambda d, rows: ["--max-length", "4096"], "max length 4096 is above"),
    "no such data file": (lambda d, rows: ["--data", str(d / "missing.csv")], "No such file"),
    "no such model": (lambda d, rows: ["--model", str(d / "no_model")], "cannot load the model"),
    "class weights past fp32": (lambda d, rows: ["--class-weights", "1e39", "1", "1", "1"],
                                "--class-weights takes balanced or numbers above 0 and at most 1e6"),
    "a bogus flag": (lambda d, rows: ["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
}


@pytest.mark.parametrize("case", BAD_TRAINING)
def test_bad_training_inputs_and_flags_are_one_line_and_exit_2(model_dirs, tmp_path, capsys, case):
    rows = synthetic_rows(60, seed=2)
    flags, message = BAD_TRAINING[case]
    argv = ["--model", model_dirs["bert"], "--max-length", "64", "--val-size", "10",
            "--data", write_csv(tmp_path / "ok.csv", rows)] + flags(tmp_path, rows)
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as stop:
        train.main(argv + ["--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2
    assert message in err and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert not out.exists()


@pytest.fixture(scope="session")
def no_dropout_model(model_dirs, tmp_path_factory):
    """The tiny RoBERTa without its own dropout: one step is then the same computation on any split."""
    folder = tmp_path_factory.mktemp("roberta_nodrop")
    save_tokenizer(folder)
    model = tiny_model("roberta")
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    model.save_pretrained(folder)
    return str(folder)


def torchrun(argv, nproc=2, script=os.path.join(HERE, "train.py")):
    """train.py (or a script that runs it) under torchrun, on the CPU with gloo (a GPU machine may have one GPU, or
    none)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                           "--standalone", str(script), *argv], capture_output=True, text=True, env=env, timeout=300)


OUT_OF_MEMORY_ON_RANK_1 = """import os, sys, torch
sys.path.insert(0, {here!r})
import train
real, calls = train.train_step, []
def step(*a, **k):  # the second process runs out of memory in its step {step}
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == {step}:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return real(*a, **k)
train.train_step = step
train.main()
"""


def batch_args(grad_accum, rank=0, world=1):
    """What micro_batches reads of train's args: the pieces, this process, the device (the CPU here)."""
    return SimpleNamespace(grad_accum=grad_accum, ddp_rank=rank, ddp_world=world, max_length=64, device=torch.device("cpu"),
                           compile=False, loss_weight=None)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("accum", [1, 2, 3])
def test_a_global_batch_is_split_so_that_ddps_average_is_the_whole_batchs_gradient(world, accum):
    import numpy as np
    tokens = data.Tokens(np.arange(37 * 3, dtype=np.int32), np.arange(0, 37 * 3 + 1, 3))
    row_ids = torch.arange(37)  # as labels: each piece says which rows it holds
    losses = torch.rand(37, dtype=torch.float64)  # one loss a row; DDP averages the processes' gradients
    for size in (1, 2, 5, 16, 37):
        rows = list(range(size))
        pieces = {rank: list(train.micro_batches(tokens, row_ids, rows, 0, batch_args(accum, rank, world)))
                  for rank in range(world)}
        assert all(len(p) == accum for p in pieces.values())  # as many on each process: DDP's sums line up
        held = [(labels, scale) for p in pieces.values() for _, _, labels, scale in p]
        assert all(len(h) > 0 for h, _ in held)
        copies = math.ceil(world * accum / size)  # a batch with fewer rows than pieces is repeated whole
        assert sorted(torch.cat([h for h, _ in held]).tolist()) == sorted(rows * copies)
        # train_step's loss: each piece's summed loss x its scale; DDP averages over the processes
        averaged = sum(losses[h].sum() * scale for h, scale in held) / world
        assert abs(averaged - losses[rows].mean()) < 1e-12, (world, size)


def test_grad_accum_gives_the_gradients_of_the_whole_batch(no_dropout_model):
    model, _, new = checkpoint.load_base_model(no_dropout_model, 4)
    inject_lora(model, 2, 4, targets=["query", "value"], skip=new)
    model.classifier.requires_grad_(True)
    for m in adapters_of(model):
        nn.init.normal_(m.lora_B.weight, std=0.1)  # every gradient non-zero
    texts = [r["text"] for r in synthetic_rows(13, seed=2)]
    from transformers import AutoTokenizer
    tokens = data.tokenize(AutoTokenizer.from_pretrained(no_dropout_model), texts, 64)
    labels, rows = torch.arange(13) % 4, list(range(13))
    grads = {}
    for accum in (1, 3, 13):
        args = SimpleNamespace(amp_dtype=None, max_grad_norm=0, lr=1e-3, weight_decay=0.01, schedule="constant",
                               warmup_ratio=0.0, **vars(batch_args(accum)))
        optimizer, scheduler, scaler = train.make_optimizer(model, args, total_steps=10)
        optimizer.step = lambda *a, accum=accum, **k: grads.setdefault(accum, {
            n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        pieces = list(train.micro_batches(tokens, labels, rows, 1, args))
        assert len(pieces) == accum
        train.train_step(model.train(), pieces, optimizer, scheduler, scaler, args)
    for accum in (3, 13):
        for name, grad in grads[1].items():
            torch.testing.assert_close(grads[accum][name], grad, rtol=1e-5, atol=1e-6)


def test_one_step_on_two_processes_equals_one_step_in_one(no_dropout_model, tmp_path, capsys, on_cpu):
    rows = synthetic_rows(15 + 8, seed=6)  # 15 training rows: one global batch (odd: one process gets 8, one 7)
    train_csv = write_csv(tmp_path / "t.csv", rows)
    argv = lambda out: ["--model", no_dropout_model, "--data", train_csv, "--out", out,  # noqa: E731
                        "--batch-size", "16", "--val-size", "8", "--epochs", "1", "--lr", "5e-2", "--dropout", "0",
                        "--max-length", "64", "--precision", "fp32"]
    single, double = str(tmp_path / "single"), str(tmp_path / "double")
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(argv(single))  # one process: no process group at all
    result = torchrun(argv(double))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("trainable in total") == 1  # only the main process prints
    a, b = (torch.load(os.path.join(d, "last_state.pt"), weights_only=True)["trained"] for d in (single, double))
    assert a.keys() == b.keys()
    for key in a:  # AdamW's first step is lr * g / (|g| + eps): a gradient within rounding of 0 may go either way
        close = torch.isclose(b[key], a[key], rtol=1e-5, atol=1e-6)
        assert close.float().mean() > 0.99 and (b[key] - a[key]).abs().max() <= 2 * 5e-2 + 1e-6, key
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)  # the step did change the adapter (B was 0)


def test_two_processes_stop_together_draw_their_own_dropout_and_resume_exactly_after_one_runs_out_of_memory(
        model_dirs, tmp_path):
    rows = [{"text": " ".join(r["text"].split()[:6]), "label": r["label"]} for r in synthetic_rows(200, seed=8)]
    train_csv = write_csv(tmp_path / "t.csv", rows)  # 6 words each: both processes draw as many numbers a step
    val_rows = [{"text": f"w{i} k1_0 w3", "label": y} for i in range(10) for y in range(4)]
    val_csv = write_csv(tmp_path / "v.csv", val_rows)  # each text under every class: accuracy 0.25, always
    argv = lambda out, *extra: ["--model", model_dirs["roberta"], "--data", train_csv, "--out", str(out),  # noqa
                                "--val-data", val_csv, "--batch-size", "16", "--eval-every", "2", "--patience", "2",
                                "--lr", "1e-2", "--max-length", "64", "--precision", "fp32", "--dropout", "0.3",
                                *extra]
    whole = torchrun(argv(tmp_path / "whole"))  # best at step 2, then two evaluations no better: stops at 6
    assert whole.returncode == 0, whole.stderr[-3000:]
    log = whole.stdout
    assert log.count("early stop: no better validation accuracy in 2 evaluations") == 1
    assert "step 6: val" in log and "step 8: val" not in log  # both processes stopped together
    assert "x 2 processes" in log
    assert sorted(f for f in os.listdir(tmp_path / "whole") if not f.endswith(".png")) == [
        "adapter.safetensors", "config.json", "last_state.pt", "metrics.jsonl"]
    assert json.load(open(tmp_path / "whole" / "config.json"))["step"] == 2
    script = tmp_path / "out_of_memory_on_rank_1.py"
    script.write_text(OUT_OF_MEMORY_ON_RANK_1.format(here=HERE, step=6))
    stopped = torchrun(argv(tmp_path / "part"), script=script)  # saved at step 4, out of memory in step 6
    errors = [line[line.index("error: "):] for line in stopped.stderr.splitlines() if "error: " in line]
    assert stopped.returncode == 1 and len(errors) == 2, stopped.stderr[-3000:]  # each process: one line
    assert 'train.py", line' not in stopped.stderr  # no traceback of ours (torchrun prints its own)
    assert any(e.startswith("error: out of memory at step 6") and "the run is saved in" in e
               and "as of step 4, its last evaluation: go on with --resume" in e for e in errors), errors
    assert any(e.startswith("error: process 0 of 2 stopped with the others") for e in errors), errors
    result = torchrun(argv(tmp_path / "part", "--resume"))
    assert result.returncode == 0 and "resumed from" in result.stdout and "at step 4" in result.stdout, \
        result.stderr[-3000:]
    assert "early stop" in result.stdout
    whole, part = (torch.load(tmp_path / d / "last_state.pt", weights_only=True) for d in ("whole", "part"))
    assert not torch.equal(whole["rng"][0]["cpu"], whole["rng"][1]["cpu"])  # two streams of dropout masks
    assert part["step"] == whole["step"] == 6
    for key in whole["trained"]:  # resumed, each process on its own stream: the same steps as without a stop
        torch.testing.assert_close(part["trained"][key], whole["trained"][key], rtol=0, atol=0)


# --- tables.py: a test.pkl is read right and read safely, as data, never run --------------------------

TEXTS, LABELS = ["first text", "zweiter Text, ü", "", "k1_0 w3"], [2, 0, 3, 1]
ORDINARY = {}  # name -> (object, texts, labels): filled once, by ordinary_tables()


def ordinary_tables():
    """The same rows in every shape people pickle them in: (object, texts it holds, labels it holds)."""
    if ORDINARY:
        return ORDINARY
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, concatenate_datasets

    rows = {"text": TEXTS, "label": LABELS}
    frame = pd.DataFrame(rows)
    news = pd.DataFrame({"id": [11, 12, 13, 14], "title": ["a", "b", "c", "d"], "text": TEXTS, "label": LABELS,
                         "url": ["u1", "u2", "u3", "u4"], "score": [0.5, float("nan"), 1.0, 2.5],
                         "when": pd.to_datetime(["2020-01-01", None, "2021-05-06", "2022-07-08"])})
    shuffled = {"text": [TEXTS[i] for i in (3, 0, 2, 1)], "label": [1, 2, 3, 0]}
    with_index = pd.DataFrame({"text": ["dropped"] + TEXTS, "label": [9] + LABELS})
    ag_news = [y + 1 for y in LABELS]  # AG News' own CSV numbers the classes 1-4
    one_row = Dataset.from_dict({"text": TEXTS[:1], "label": LABELS[:1]})
    many = {"text": [f"text {i}" for i in range(4000)], "label": [i % 4 for i in range(4000)],
            **{f"flag{c}": [bool(i % (c + 2)) for i in range(4000)] for c in range(60)}}
    order = Dataset.from_dict(many).shuffle(seed=0)["label"]  # what the shuffled Dataset holds, in its order
    long_texts = pd.DataFrame({"text": [t * 40 for t in TEXTS], "label": LABELS})
    ORDINARY.update({
        "Dataset.from_dict": (Dataset.from_dict(rows), TEXTS, LABELS),
        "Dataset.from_pandas": (Dataset.from_pandas(frame), TEXTS, LABELS),
        "Dataset with a ClassLabel": (Dataset.from_dict(rows, features=Features(
            {"text": Value("string"), "label": ClassLabel(names=["World", "Sports", "Business", "Sci/Tech"])})),
            TEXTS, LABELS),
        "Dataset of large_string": (Dataset.from_dict(rows, features=Features(
            {"text": Value("large_string"), "label": Value("int64")})), TEXTS, LABELS),
        "Dataset after select": (Dataset.from_dict(shuffled).select([1, 3, 2, 0]), TEXTS, LABELS),
        "Dataset after shuffle": (Dataset.from_dict(rows).shuffle(seed=0).sort("label").select([2, 0, 3, 1]),
                                  TEXTS, LABELS),
        "concatenate_datasets": (concatenate_datasets([one_row, Dataset.from_dict(
            {"text": TEXTS[1:], "label": LABELS[1:]})]), TEXTS, LABELS),
        "Dataset.add_column": (Dataset.from_dict({"text": TEXTS}).add_column("label", LABELS), TEXTS, LABELS),
        "DatasetDict of one split": (DatasetDict({"test": Dataset.from_dict(rows)}), TEXTS, LABELS),
        "DataFrame, pandas' default str": (frame, TEXTS, LABELS),
        "DataFrame, object": (frame.astype({"text": object}), TEXTS, LABELS),
        "DataFrame, StringDtype python": (frame.astype({"text": pd.StringDtype("python")}), TEXTS, LABELS),
        "DataFrame, StringDtype pyarrow": (frame.astype({"text": pd.StringDtype("pyarrow")}), TEXTS, LABELS),
        "DataFrame, ArrowDtype(string)": (frame.astype({"text": pd.ArrowDtype(pa.string())}), TEXTS, LABELS),
        "DataFrame, filtered": (with_index[with_index.label < 9], TEXTS, LABELS),
        "DataFrame of news: ints, floats, NaN, dates": (news, TEXTS, LABELS),
        "DataFrame of news, object columns": (news.astype({"title": object, "text": object, "url": object}),
                                              TEXTS, LABELS),
        "DataFrame, category text": (frame.astype({"text": "category"}), TEXTS, LABELS),
        "DataFrame, category labels 1-4 in another order": (pd.DataFrame({"text": TEXTS, "label": pd.Categorical(
            ag_news, categories=[4, 2, 3, 1])}), TEXTS, ag_news),
        "DataFrame, nullable Int64 labels": (frame.astype({"label": "Int64"}), TEXTS, LABELS),
        "DataFrame, a missing text": (pd.DataFrame({"text": [None] + TEXTS[1:], "label": LABELS}),
                                      [None] + TEXTS[1:], LABELS),
        "Series of texts": (pd.Series(TEXTS), TEXTS, None),
        "list of texts": (list(TEXTS), TEXTS, None),
        "numpy array of texts": (np.array(TEXTS), TEXTS, None),
        "list of row dicts": ([{"text": t, "label": y} for t, y in zip(TEXTS, LABELS)], TEXTS, LABELS),
        "tuple of row dicts": (tuple({"text": t, "label": y} for t, y in zip(TEXTS, LABELS)), TEXTS, LABELS),
        "rows with numpy labels": ([{"text": t, "label": np.int64(y)} for t, y in zip(TEXTS, LABELS)],
                                   TEXTS, LABELS),
        "dict of columns, numpy labels": ({"text": TEXTS, "label": np.array(LABELS)}, TEXTS, LABELS),
        "dict of numpy unicode columns": ({"text": np.array(TEXTS), "label": np.array(LABELS)}, TEXTS, LABELS),
        "Dataset of 60 bool columns, shuffled": (Dataset.from_dict(many).shuffle(seed=0),
                                                 Dataset.from_dict(many).shuffle(seed=0)["text"], order),
        "DataFrame repeated ten times (each text memoized once)": (pd.concat([long_texts.astype(object)] * 10),
                                                                  [t * 40 for t in TEXTS] * 10, LABELS * 10),
        "empty DataFrame": (pd.DataFrame({"text": [], "label": []}).astype({"text": object, "label": int}), [], []),
        "Dataset of 500 one-row Arrow chunks": (Dataset(pa.Table.from_batches([pa.record_batch(
            {"text": [f"x{i}"], "label": [i % 4]}) for i in range(500)])), [f"x{i}" for i in range(500)],
            [i % 4 for i in range(500)]),
        "concatenate_datasets of 200 one-row Datasets": (concatenate_datasets([Dataset.from_dict(
            {"text": [f"t{i}"], "label": [i % 4]}) for i in range(200)]), [f"t{i}" for i in range(200)],
            [i % 4 for i in range(200)]),
        "dict of pandas Series": ({"text": frame["text"], "label": frame["label"]}, TEXTS, LABELS),
        "row dicts, the first without a label": ([{"text": TEXTS[0]}] + [{"text": t, "label": y} for t, y in zip(
            TEXTS[1:], LABELS[1:])], TEXTS, [None] + LABELS[1:]),
        "'ustar' at byte 257 of a text": ({"text": ["x" * 230 + "custard" * 10]}, ["x" * 230 + "custard" * 10],
                                           None),
    })
    return ORDINARY


ORDINARY_NAMES = ["Dataset.from_dict", "Dataset.from_pandas", "Dataset with a ClassLabel", "Dataset of large_string",
                  "Dataset after select", "Dataset after shuffle", "concatenate_datasets", "Dataset.add_column",
                  "DatasetDict of one split", "DataFrame, pandas' default str", "DataFrame, object",
                  "DataFrame, StringDtype python", "DataFrame, StringDtype pyarrow", "DataFrame, ArrowDtype(string)",
                  "DataFrame, filtered", "DataFrame of news: ints, floats, NaN, dates",
                  "DataFrame of news, object columns", "DataFrame, category text",
                  "DataFrame, category labels 1-4 in another order", "DataFrame, nullable Int64 labels",
                  "DataFrame, a missing text", "Series of texts", "list of texts", "numpy array of texts",
                  "list of row dicts", "tuple of row dicts", "rows with numpy labels", "dict of columns, numpy labels",
                  "dict of numpy unicode columns", "Dataset of 60 bool columns, shuffled",
                  "DataFrame repeated ten times (each text memoized once)", "empty DataFrame",
                  "'ustar' at byte 257 of a text", "Dataset of 500 one-row Arrow chunks",
                  "concatenate_datasets of 200 one-row Datasets", "row dicts, the first without a label",
                  "dict of pandas Series"]


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("name", ORDINARY_NAMES)
def test_every_ordinary_pickle_loads_with_its_texts_labels_and_order(name, protocol):
    table, texts, labels = ordinary_tables()[name]
    read_texts, read_labels, _ = tables.read_here(pickle.dumps(table, protocol=protocol))
    assert read_texts == texts
    assert read_labels == labels and all(type(y) is int for y in read_labels or [] if y is not None)


# pickles made by older pandas, pyarrow and datasets than CI has: testdata/make_pickles.py made them
OLD_PICKLES = sorted(f for f in os.listdir(os.path.join(HERE, "testdata")) if f.endswith(".pkl") and "polars" not in f)


@pytest.mark.parametrize("name", OLD_PICKLES)
def test_pickles_from_older_pandas_and_datasets_load(name):
    raw = open(os.path.join(HERE, "testdata", name), "rb").read()
    assert tables.read_here(raw)[:2] == (["x one", "y two", "z \u00fc"], [1, 2, 3])


@pytest.mark.parametrize("suffix", [".pkl.gz", ".pkl.bz2", ".pkl.xz", ".pkl.zip", ".gz named .pkl"])
def test_compressed_pickles_are_recognised_by_their_bytes(tmp_path, suffix):
    import gzip
    import pandas as pd
    frame = pd.DataFrame({"text": TEXTS, "label": LABELS})
    path = tmp_path / ("test" + suffix.split()[0])
    frame.to_pickle(path)  # pandas compresses by the file's name, as people write it
    if suffix.endswith("named .pkl"):
        path = tmp_path / "test.pkl"
        path.write_bytes(gzip.compress(pickle.dumps(frame)))
    assert data.read_texts(str(path)) == (TEXTS, LABELS)  # the whole way: data.py, the child, back


def refusal(path):
    with pytest.raises(data.InputError) as refused:
        data.read_texts(str(path))
    return str(refused.value)


def test_other_formats_get_one_line_naming_them_and_the_way_to_convert(tmp_path):
    import pandas as pd
    from datasets import Dataset, DatasetDict
    frame = pd.DataFrame({"text": TEXTS, "label": LABELS})
    frame.to_pickle(tmp_path / "test.pkl.tar")
    (tmp_path / "zstd.pkl").write_bytes(b"(\xb5/\xfd" + b"\0" * 20)
    (tmp_path / "two.pkl").write_bytes(pickle.dumps(DatasetDict({"test": Dataset.from_dict({"text": TEXTS}),
                                                                 "train": Dataset.from_dict({"text": TEXTS})})))
    (tmp_path / "bomb.pkl").write_bytes(__import__("gzip").compress(b"\0" * 80 * 2**20))
    cases = [(os.path.join(HERE, "testdata", "pandas2.2_polars.pkl"), "a polars DataFrame", "write_parquet"),
             (tmp_path / "test.pkl.tar", "a tar archive", "tar xf"), (tmp_path / "zstd.pkl", "zstd", "zstd -d"),
             (tmp_path / "two.pkl", "a DatasetDict of 2 splits ('test', 'train')", "pickle.dump(dsd['test'], f)"),
             (tmp_path / "bomb.pkl", "gzip-compressed and expands to over", "decompress it yourself")]
    for path, what, fix in cases:
        message = refusal(path)
        assert what in message and fix in message and len(message.splitlines()) == 1, message


class Call:
    """What a hostile pickle asks for: call module.name(*args), then hand the result `state`."""

    def __init__(self, where, *args, state=None):
        self.where, self.args, self.state = where, args, state


def assemble(value, out=None):
    """A pickle written opcode by opcode (protocol 4, no frames), so a test says exactly what is in it."""
    import struct
    out = bytearray(b"\x80\x04") if out is None else out  # PROTO 4
    if isinstance(value, Call):
        module, _, name = value.where.rpartition(".")
        assemble(module, out), assemble(name, out)
        out += pickle.STACK_GLOBAL
        assemble(tuple(value.args), out)
        out += pickle.REDUCE
        if value.state is not None:
            assemble(value.state, out)
            out += pickle.BUILD
    elif isinstance(value, bytes) and value.startswith(b"RAW:"):  # opcodes as given
        out += value[4:]
    elif value is None or isinstance(value, bool):
        out += {None: pickle.NONE, True: pickle.NEWTRUE, False: pickle.NEWFALSE}[value]
    elif isinstance(value, int):
        out += pickle.LONG1 + bytes([8]) + value.to_bytes(8, "little", signed=True)
    elif isinstance(value, str):
        encoded = value.encode("utf-8", "surrogatepass")
        out += pickle.BINUNICODE + struct.pack("<I", len(encoded)) + encoded
    elif isinstance(value, (bytes, bytearray)):
        out += pickle.BINBYTES + struct.pack("<I", len(value)) + bytes(value)
    elif isinstance(value, (list, tuple, dict)):
        out += pickle.MARK
        for item in (value.items() if isinstance(value, dict) else value):
            for part in (item if isinstance(value, dict) else (item,)):
                assemble(part, out)
        out += {list: pickle.LIST, tuple: pickle.TUPLE, dict: pickle.DICT}[type(value)]
    return out


def pickled(value):
    return bytes(assemble(value) + pickle.STOP)


def arrow_strings(offsets, data_bytes, length, offset=0, large=False):
    """A pyarrow string array as pyarrow pickles it, with whatever offsets the test wants."""
    import struct
    return Call("pyarrow.lib._restore_array", (Call("pyarrow.lib.type_for_alias", "large_string" if large else "string"),
                length, 0, offset, [None, Call("pyarrow.lib.py_buffer", struct.pack(
                    f"<{len(offsets)}{'q' if large else 'i'}", *offsets)), Call("pyarrow.lib.py_buffer", data_bytes)],
                [], None))


def dataset(text_column, data_class="datasets.table.InMemoryTable", table_state=None):
    """A datasets.Dataset pickle around one text column."""
    table = Call("pyarrow.lib._reconstruct_table", [Call("pyarrow.lib.chunked_array", [text_column])],
                 Call("pyarrow.lib.schema", [Call("pyarrow.lib.field", "text")], None))
    return Call("datasets.arrow_dataset.Dataset", state={"_data": Call(data_class, state=table_state or
                                                                       {"table": table}), "_indices": None})


def frame(block_values, placement, column_names=("text",)):
    """A pandas DataFrame pickle with one block placed at `placement` (start, stop, step)."""
    names = Call("numpy._core.multiarray._reconstruct", Call("numpy.ndarray"), (0,), b"b",
                 state=(1, (len(column_names),), Call("numpy.dtype", "O8", False, True), False, list(column_names)))
    manager = Call("pandas.core.internals.managers.BlockManager", (
        Call("pandas._libs.internals._unpickle_block", block_values, Call("builtins.slice", *placement), 2),),
        [Call("pandas.core.indexes.base._new_Index", Call("pandas.Index"), {"data": names}),
         Call("pandas.core.indexes.base._new_Index", Call("pandas.RangeIndex"), {"start": 0, "stop": 1, "step": 1})])
    return Call("pandas.core.frame.DataFrame", state={"_mgr": manager})


def zipped_like_finder(raw):
    """A zip holding test.pkl and the __MACOSX/ resource fork that macOS's Finder adds beside it."""
    import zipfile
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("test.pkl", raw)
        archive.writestr("__MACOSX/._test.pkl", b"\x00\x05\x16\x07")
    return buffer.getvalue()


def shared(value, times):
    """A list holding one memoized value `times` times: a few bytes a row, however large the value."""
    return b"RAW:" + assemble(value, bytearray()) + pickle.BINPUT + b"\x00" + pickle.POP + pickle.MARK + \
        (pickle.BINGET + b"\x00") * times + pickle.LIST


def colliding_keys(count, as_set=False):
    """A dict (or set) of `count` 16-tuples of -1 and -2: hash(-1) == hash(-2), so all hash alike."""
    keys = b"".join(b"(" + b"".join(b"J" + (-1 - (i >> bit & 1)).to_bytes(4, "little", signed=True)
                                    for bit in range(16)) + b"t" + (b"" if as_set else b"N") for i in range(count))
    return b"\x80\x04" + (b"\x8f(" + keys + b"\x90." if as_set else b"}(" + keys + b"u.")


def stale_nesting(depth):
    """Lists made empty and memoized first, then each appended into the one before: `depth` deep, though
    every list looked empty when it was memoized."""
    made = b"".join(b"]r" + i.to_bytes(4, "little") + b"0" for i in range(depth))
    linked = b"".join(b"j" + i.to_bytes(4, "little") + b"j" + (i + 1).to_bytes(4, "little") + b"a0"
                      for i in range(depth - 1))
    return b"\x80\x02" + made + linked + b"j\x00\x00\x00\x00."


def shared_structure(value, times, close=pickle.TUPLE):
    """`times` references to one memoized value, in a tuple (or a list): read each time, unless charged."""
    return b"RAW:" + pickle.MARK + assemble(value, bytearray()) + pickle.BINPUT + b"\x03" + \
        (pickle.BINGET + b"\x03") * (times - 1) + close


def wide_frame_of_shared_blocks(width, blocks):
    """A DataFrame of `width` columns named "x", and one block spanning them all, placed `blocks` times."""
    block = Call("pandas._libs.internals._unpickle_block", None, Call("builtins.slice", 0, width, 1), 2)
    return pickled(Call("pandas.core.frame.DataFrame", state={"_mgr": Call("pandas.core.internals.managers.BlockManager",
        shared_structure(block, blocks), [Call("pandas.core.indexes.base._new_Index", Call("pandas.Index"),
                                               {"data": shared("x", width)}), None])}))


def concatenation_of_a_wide_table(width, times):
    """A ConcatenationTable naming one table of `width` fields `times` times."""
    table = Call("datasets.table.InMemoryTable", state={"table": Call("pyarrow.lib._reconstruct_table", [None] * width,
                 Call("pyarrow.lib.schema", shared_structure(Call("pyarrow.lib.field", "x"), width, pickle.LIST),
                      None))})
    return pickled(Call("datasets.arrow_dataset.Dataset", state={"_data": Call("datasets.table.ConcatenationTable",
                   state={"blocks": shared_structure([table], times, pickle.LIST)}), "_indices": None}))


def tuple_dag(depth):
    """A tuple pair of pairs of ... 60 deep, each level the level below twice (memo): its repr is 2**60 long."""
    out = bytearray(assemble("a" * 1000, bytearray())) + pickle.BINPUT + b"\x00" + pickle.POP
    for k in range(depth):
        out += pickle.BINGET + bytes([k]) + pickle.BINGET + bytes([k]) + pickle.TUPLE2 + pickle.BINPUT + bytes([k + 1])
        out += pickle.POP if k + 1 < depth else b""
    return b"RAW:" + bytes(out)


def hostile_pickles(marker, fifo):
    """One file per kind of attack: (what it tries, bytes, what the refusal must say; None: it loads)."""
    run_shell = Call("os.system", f"touch {marker}")
    doubled = b"RAW:" + assemble(arrow_strings([0, 1], b"a", 1), bytearray())
    for level in range(40):  # each level a chunk list naming the level below twice (memo): 2**40 chunks
        doubled = b"RAW:" + assemble(doubled, bytearray()) + pickle.BINPUT + bytes([level]) + pickle.POP + \
            assemble(Call("pyarrow.lib.chunked_array", [b"RAW:" + pickle.BINGET + bytes([level])] * 2), bytearray())
    forged_dtype = Call("numpy.dtype", "O8", False, True, state=(3, "|", None, None, None, -1, -1, 63))
    looped = []
    looped.append(looped)
    return [
        # code: nothing is ever called, and a file that names code is refused
        ("os.system at the top", pickled(run_shell), "names os.system, which no data file needs"),
        ("os.system inside a row", pickled([{"text": run_shell}]), "names os.system"),
        ("eval in a column nobody reads", pickled({"text": ["a"], "notes": [Call("builtins.eval", "1")]}),
         "names builtins.eval"),
        ("getattr, as an enum would be pickled", pickled({"text": [Call("builtins.getattr", "x", "y")]}),
         "names builtins.getattr"),
        ("MemoryMappedTable replaying calls on a file", pickled(dataset(None, "datasets.table.MemoryMappedTable", {
            "path": str(fifo), "replays": [("__getattribute__", ("__reduce__",), {})]})),
         "holds a path on the machine that made it"),
        ("ClassLabel reading names_file", pickled({"text": ["a"], "label": [0], "features": Call(
            "datasets.features.features.ClassLabel", state={"names_file": str(fifo)})}), None),
        # shapes and offsets that lie
        ("object dtype with forged flags over raw bytes", pickled({"text": Call(
            "numpy._core.numeric._frombuffer", b"\x41" * 16, forged_dtype, (2,), "C")}),
         "items do not match its shape"),
        ("pandas block placed outside its frame", pickled(frame(arrow_strings([0, 1], b"a", 1), (5, 6, 1))),
         "lies outside its frame"),
        ("Arrow offsets past the data buffer", pickled(dataset(arrow_strings([0, 4000], b"abc", 1))),
         "offsets run outside its data"),
        ("Arrow offsets going backwards", pickled(dataset(arrow_strings([0, 3, 1], b"abc", 2))),
         "offsets run outside its data"),
        ("Arrow offsets whose steps wrap around in int32", pickled(dataset(arrow_strings(
            [0, 2**31 - 1, -2**31 + 1, 2], b"abc", 3))), "offsets run outside its data"),
        ("Arrow offsets whose steps wrap around in int64", pickled(dataset(arrow_strings(
            [0, 2**63 - 1, -2**63 + 1, 2], b"abc", 3, large=True))), "offsets run outside its data"),
        ("a first offset of 2**62 (a negative charge)", pickled(dataset(arrow_strings(
            [2**62, 2**62 + 1, 1], b"abc", 2, large=True))), "offsets run outside its data"),
        ("Arrow length past its offsets", pickled(dataset(arrow_strings([0, 1], b"abc", 100))), "too few offsets"),
        ("bytearray(20 GB) as a buffer", pickled(dataset(Call("pyarrow.lib._restore_array", (
            Call("pyarrow.lib.type_for_alias", "string"), 1, 0, 0,
            [None, Call("builtins.bytearray", 20_000_000_000), Call("builtins.bytearray", 20_000_000_000)], [],
            None)))), "a buffer is not plain bytes"),
        ("BYTEARRAY8 claiming 2**40 bytes", b"\x80\x05\x96" + (2**40).to_bytes(8, "little") + b"ab.",
         "expected 1099511627776 bytes in a bytearray8, but only 3 remain"),
        ("a DataFrame naming a text column that no block fills", pickled(Call("pandas.core.frame.DataFrame", state={
            "_mgr": Call("pandas.core.internals.managers.BlockManager", (), [Call(
                "pandas.core.indexes.base._new_Index", Call("pandas.Index"), {"data": ["text"]}), None])})),
         "its `text` column has no data"),
        # memory and time that grow faster than the file
        ("a memo slot far past the file", b"\x80\x04" + pickle.EMPTY_LIST + pickle.LONG_BINPUT +
         (2**32 - 2).to_bytes(4, "little") + pickle.STOP, "slot 4294967294"),
        ("5 MB of MEMOIZE opcodes", b"\x80\x04]" + b"\x94" * 5_000_000 + b".", "memo is not as a pickler writes it"),
        ("one 100 kB string shared by 5,000 rows", pickled({"text": shared("x" * 100_000, 5000)}),
         "more rows or text than its size can honestly hold"),
        ("one array repeated in chunks, 40 levels deep", pickled(dataset(doubled)),
         "more rows or text than its size can honestly hold"),
        ("one 1 MB text shared by 8 rows (within the budget: the tokenizer's cut bounds its cost)",
         pickled({"text": shared("w1 " * 350_000, 8)}), None),
        ("out-of-band buffer", b"\x80\x05\x97.", "from outside the file"),
        ("40,000 tuple keys of one hash in a dict", colliding_keys(40_000), "a key that is not a string or a number"),
        ("40,000 tuples of one hash in a set", colliding_keys(40_000, as_set=True),
         "a key that is not a string or a number"),
        ("a tuple nested 300,000 deep as a dict key", b"\x80\x02}" + b")" + b"\x85" * 300_000 + b"K\x01s.",
         "builds more values than its size can honestly hold"),
        ("a tuple as a dict key", b"\x80\x02}" + b")" + b"\x85" * 100 + b"K\x01s.", "a key that is not a string"),
        ("40,000 ints with one hash in a dict", b"\x80\x02}(" + b"".join(
            b"\x8a\x0b" + (i * (2**61 - 1)).to_bytes(11, "little", signed=True) + b"N" for i in range(1, 40_001))
         + b"u.", "an integer too large for a table cell"),
        ("a list nested 1,000 deep", b"\x80\x02" + b"(" * 1000 + b"]" + b"l" * 1000 + b".", "nests values over 200 deep"),
        ("lists nested 100,000 deep after they were memoized", stale_nesting(100_000), "nests values over 200 deep"),
        ("a list that holds itself", pickle.dumps(looped), "a value that contains itself"),
        # found by the attacker: work, text or memory that grew faster than the file
        ("one block placed over 25,000 columns, 25,000 times", wide_frame_of_shared_blocks(25_000, 25_000),
         "more rows or text than its size can honestly hold"),
        ("one table of 8,000 fields concatenated 8,000 times", concatenation_of_a_wide_table(8_000, 8_000),
         "more rows or text than its size can honestly hold"),
        ("a Dataset selecting one 30 kB text 10,000 times", pickle.dumps(__import__("datasets").Dataset.from_dict(
            {"text": ["w" * 30_000], "label": [0]}).select([0] * 10_000)),
         "more rows or text than its size can honestly hold"),
        ("a shape whose repr is 2**60 long, in an error message", pickled({"text": Call(
            "numpy._core.multiarray._reconstruct", Call("numpy.ndarray"), (0,), b"b", state=(
                1, (tuple_dag(60),), Call("numpy.dtype", "O8", False, True), False, ["a"]))}),
         "a numpy dimension is"),
        ("3 MB of one-byte EMPTY_SETs", b"\x80\x04(" + b"\x8f" * 3_000_000 + b"l.",
         "builds more values than its size can honestly hold"),
        ("one empty Arrow chunk named 190,000 times", pickled(dataset(Call("pyarrow.lib.chunked_array", shared_structure(
            arrow_strings([0], b"", 0), 190_000, pickle.LIST)))), "more rows or text than its size can honestly hold"),
        ("750,000 emoji shared by 32 rows (12 bytes each as ASCII JSON)", pickled({"text": shared("\U0001F600" * 750_000,
                                                                                                    32)}), None),
        # found by the second attacker
        ("a 2 MB text of control characters shared by 16 rows (6 bytes each as JSON)",
         pickled({"text": shared("\x01" * 2_000_000, 16)}), None),
        ("a 270 kB gzip file expanding 40 times (random bytes raise its allowance)", __import__("gzip").compress(
            b"\x80\x04B" + (2**18 + 10**7).to_bytes(4, "little") + __import__("random").Random(0).randbytes(2**18)
            + bytes(10**7) + b"0]."), "gzip-compressed and expands to over"),
        ("a zip from macOS Finder (its __MACOSX entry beside the pickle)", zipped_like_finder(
            pickle.dumps({"text": ["a", "b"]})), None),
        ("a 96-byte bz2 file expanding to 64 MB", __import__("bz2").compress(b"\x80\x04(" + b"\x8f" * 64_000_000 + b"l."),
         "expands to over 4,194,304 bytes"),
        ("a list of tuples", pickle.dumps([("great movie", 1), ("awful plot", 0)]), "a text or label is tuple"),
        ("a list of bytes", pickle.dumps([b"great movie", b"awful plot"]), "a text or label is bytes"),
        ("a DataFrame whose columns are numbered, not named", pickle.dumps(__import__("pandas").DataFrame(
            [["a", 1]])), "its columns are numbered, not named"),
        ("columns under a MultiIndex", pickle.dumps(__import__("pandas").DataFrame(
            [["a", 1]], columns=__import__("pandas").MultiIndex.from_tuples([("x", "text"), ("x", "label")]))),
         "column names are not plain names (a MultiIndex?)"),
        # not pickles at all
        ("garbled bytes", b"\x80\x04\xffnot a pickle at all", "not a readable table pickle"),
        ("empty file", b"", "not a readable table pickle"),
        ("invalid UTF-8 in an Arrow string", pickled(dataset(arrow_strings([0, 2], b"\xff\xfe", 1))), "not UTF-8"),
        ("a lone surrogate in a text (read, then made U+FFFD)", pickled({"text": ["ok \ud800 then"]}), None),
    ]


def test_hostile_pickles_end_in_one_line_and_run_nothing(trained, tmp_path, capsys):
    import time
    marker, fifo = tmp_path / "pwned", tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it would hang: any test that opens a path named in the pickle never ends
    out = tmp_path / "submission.csv"
    for attack, raw, message in hostile_pickles(marker, fifo)[::5]:  # all: the memory-cap test below
        path = tmp_path / "test.pkl"
        path.write_bytes(raw)
        start = time.perf_counter()
        with pytest.raises(SystemExit) as stop:
            predict.main([str(path), "--checkpoint", trained["out"], "--out", str(out)])
            raise SystemExit(0)
        seconds, err = time.perf_counter() - start, capsys.readouterr().err.strip()
        assert seconds < 30, (attack, seconds)
        assert not marker.exists(), attack
        if message is None:  # harmless data: predicted, and any warning is one line each
            assert stop.value.code == 0 and out.exists() and all(line.startswith("warning: ") for line in
                                                                 err.splitlines()), (attack, err)
            out.unlink()
            continue
        assert stop.value.code == 2, attack
        assert err.startswith("error: ") and len(err.splitlines()) == 1 and message in err, (attack, err)
        assert not out.exists(), attack


def test_hostile_pickles_are_read_within_a_memory_cap(tmp_path):
    """The attacks again, from a process allowed 1 GiB more than it has; the peak memory of the readers (each a
    child of it) and of it (what came back, decoded) is measured. (VmHWM, not ru_maxrss: that counts what the
    process was before exec, a copy of pytest.)"""
    marker, fifo = tmp_path / "pwned", tmp_path / "fifo"
    os.mkfifo(fifo)
    paths, attacks = [], hostile_pickles(marker, fifo)
    for i, (_, raw, _) in enumerate(attacks):
        (tmp_path / f"{i}.pkl").write_bytes(raw)
        paths.append(str(tmp_path / f"{i}.pkl"))
    script = ("import json, resource, sys, tables\n"
              "with open('/proc/self/statm') as f: used = int(f.read().split()[0]) * resource.getpagesize()\n"
              "resource.setrlimit(resource.RLIMIT_AS, (used + 2**30, resource.RLIM_INFINITY))\n"
              "for path in sys.argv[1:]:\n"
              "    try: tables.read_pickle(path); print('loaded')\n"
              "    except tables.NotReadable as e: print(json.dumps(str(e)))\n"
              "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
              "print(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')))\n")
    result = subprocess.run([sys.executable, "-c", script, *paths], capture_output=True, text=True, cwd=HERE,
                            timeout=600)
    assert result.returncode == 0 and result.stderr == "", result.stderr[-2000:]
    *outcomes, child_kib, parent_kib = result.stdout.splitlines()
    assert len(outcomes) == len(attacks)
    for (attack, _, message), outcome in zip(attacks, outcomes):  # each refused in its one line
        refusal = None if outcome == "loaded" else json.loads(outcome)
        assert (refusal is None) == (message is None), (attack, outcome)
        assert refusal is None or (message in refusal and len(refusal.splitlines()) == 1), (attack, refusal)
    assert int(child_kib) < 400 * 1024  # KiB: the largest reader's peak, for files of at most 5 MB
    assert int(parent_kib) < 400 * 1024  # and what came back, decoded
    assert not marker.exists()


def test_the_reader_is_contained_in_a_child_with_limits(tmp_path):
    from datasets import Dataset
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    texts = [r["text"] for r in synthetic_rows(8000, seed=0)]
    table = tmp_path / "test.pkl"
    table.write_bytes(pickle.dumps(Dataset.from_dict({"text": texts})))
    slow = tmp_path / "slow.pkl"  # 4 MB of tiny opcodes: about 3 s to scan, fine within the default limits
    slow.write_bytes(b"\x80\x04" + b"N0" * 2_000_000 + b"].")
    tight = dict(tables.LIMITS, cpu_s=0, cpu_s_per_mb=0, wall_margin_s=60)  # 1 s of CPU time
    cases = [(fifo, tables.LIMITS, "not a regular file"),
             (slow, tight, "used more CPU time than a file of its size may take"),
             (table, dict(tables.LIMITS, memory=2**20, memory_per_byte=0), "more memory than a file of its size"),
             (table, dict(tables.LIMITS, cpu_s=0, cpu_s_per_mb=0, wall_margin_s=0.001), "reading it took over")]
    for path, limits, message in cases:
        with pytest.raises(tables.NotReadable) as refused:
            tables.read_pickle(str(path), limits)
        assert message in str(refused.value) and len(str(refused.value).splitlines()) == 1, str(refused.value)
    assert tables.read_pickle(str(table)) == (texts, None, [])


def test_an_8000_row_test_set_loads_in_well_under_a_second(tmp_path):
    import time
    from datasets import Dataset
    rows = synthetic_rows(8000, seed=0)
    path = tmp_path / "test.pkl"
    path.write_bytes(pickle.dumps(Dataset.from_dict({"text": [r["text"] for r in rows]})))
    seconds = []
    for _ in range(3):  # the whole way, child process included
        start = time.perf_counter()
        texts, labels = data.read_texts(str(path))
        seconds.append(time.perf_counter() - start)
    assert sorted(seconds)[1] < 0.5
    assert texts == [r["text"] for r in rows] and labels is None


# --- tables.py: every format read right, and every malformed file refused in one line ------------



def write(tmp_path, name, content):
    """The path of a new file `name` holding `content` (str: as UTF-8)."""
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return str(path)


def file(name, content):
    """A case's make: a file `name` holding `content`, made in tmp_path."""
    return lambda tmp_path: write(tmp_path, name, content)


def pyarrow_table(columns):
    import pyarrow as pa
    return pa.table(columns)


# --- parquet files made wrong: a footer patched to claim what its pages do not hold ---------------

def varint(n):
    """n as a Thrift compact varint (parquet's footer is Thrift): 7 bits a byte, low first."""
    out = bytearray()
    while True:
        out.append(n & 0x7F | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def i64(n):
    """A Thrift compact i64 field of delta 1 (header 0x16) holding n (zigzag: n >= 0 is 2n)."""
    return b"\x16" + varint(2 * n)


def parquet_bytes(table, **options):
    import pyarrow.parquet as pq
    out = io.BytesIO()
    pq.write_table(table, out, **options)
    return out.getvalue()


def patch_footer(raw, old, new):
    """A parquet file's bytes with `old` (found once in its footer) replaced by `new`."""
    length = struct.unpack("<i", raw[-8:-4])[0]
    footer = raw[-8 - length:-8]
    assert footer.count(old) == 1
    footer = footer.replace(old, new)
    return raw[:-8 - length] + footer + struct.pack("<i", len(footer)) + b"PAR1"


def parquet_claiming_rows(tmp_path, claimed=10**9, in_row_group=10**9, rows=10_000):
    """`rows` incompressible texts (10,000: 9 MB) whose footer claims `claimed` rows, and its one
    row group `in_row_group`."""
    import pyarrow.parquet as pq
    texts = [os.urandom(450).hex() for _ in range(rows)]
    raw = parquet_bytes(pyarrow_table({"text": texts}), compression="none")
    group = pq.ParquetFile(io.BytesIO(raw)).metadata.row_group(0)
    # FileMetaData: ... schema (a list, ending in a struct's stop byte 0), num_rows, row_groups
    raw = patch_footer(raw, b"\0" + i64(rows) + b"\x19", b"\0" + i64(claimed) + b"\x19")
    # RowGroup: columns, total_byte_size, num_rows
    raw = patch_footer(raw, i64(group.total_byte_size) + i64(rows),
                       i64(group.total_byte_size) + i64(in_row_group))
    return write(tmp_path, "rows.parquet", raw)


def parquet_claiming_size(tmp_path):
    """A column chunk whose footer says it takes 10**12 bytes uncompressed."""
    import pyarrow.parquet as pq
    raw = parquet_bytes(pyarrow_table({"text": TEXTS}), compression="none")
    chunk = pq.ParquetFile(io.BytesIO(raw)).metadata.row_group(0).column(0)
    # ColumnMetaData: ... num_values, total_uncompressed_size, total_compressed_size
    sizes = [i64(n) for n in (chunk.num_values, chunk.total_uncompressed_size,
                              chunk.total_compressed_size)]
    lie = sizes[0] + i64(10**12) + sizes[2]
    return write(tmp_path, "size.parquet", patch_footer(raw, b"".join(sizes), lie))


def parquet_of(tmp_path, name, table, **options):
    return write(tmp_path, name, parquet_bytes(table, **options))


def repeated_parquet(tmp_path):
    """2,000 copies of one 2,000-character text: a few KB on disk, 4 MB once read."""
    return parquet_of(tmp_path, "repeated.parquet", pyarrow_table({"text": ["x" * 2000] * 2000}))


def good_parquet():
    return parquet_bytes(pyarrow_table({"text": TEXTS, "label": LABELS}))


def duplicate_parquet(tmp_path):
    import pyarrow as pa
    table = pa.Table.from_arrays([pa.array(TEXTS), pa.array(TEXTS)], names=["text", "text"])
    return parquet_of(tmp_path, "twice.parquet", table)


# --- save_to_disk folders made wrong, by hand: state.json and Arrow IPC streams ----------------

def arrow_stream(table):
    import pyarrow as pa
    out = pa.BufferOutputStream()
    with pa.ipc.new_stream(out, table.schema) as writer:
        writer.write_table(table)
    return out.getvalue().to_pybytes()


def folder(tmp_path, files=None, state=None, name="ds"):
    """A folder as save_to_disk writes it (state.json naming data.arrow), with `files` changed."""
    path = tmp_path / name
    path.mkdir()
    state = {"_data_files": [{"filename": "data.arrow"}]} if state is None else state
    content = {"data.arrow": arrow_stream(pyarrow_table({"text": TEXTS, "label": LABELS})),
               "state.json": json.dumps(state), **(files or {})}
    for file_name, body in content.items():
        if body is not None:
            write(path, file_name, body)
    return str(path)


def naming(filename):
    return lambda tmp_path: folder(tmp_path, state={"_data_files": [{"filename": filename}]})


def symlinked_data_file(tmp_path):
    """data.arrow: a link to a good Arrow file outside the folder (the link is the fault)."""
    path = folder(tmp_path, files={"data.arrow": None})
    outside = write(tmp_path, "outside.arrow", arrow_stream(pyarrow_table({"text": TEXTS})))
    os.symlink(outside, os.path.join(path, "data.arrow"))
    return path


def truncated_arrow(tmp_path):
    whole = arrow_stream(pyarrow_table({"text": TEXTS * 100}))
    return folder(tmp_path, files={"data.arrow": whole[:len(whole) // 2]})


def dataset_dict(tmp_path, splits):
    path = tmp_path / "dsd"
    path.mkdir()
    (path / "dataset_dict.json").write_text(json.dumps({"splits": splits}))
    for split in splits:
        if tables.plain_name(split):
            folder(path, name=split)
    return str(path)


def train_linked_outside(tmp_path):
    """A DatasetDict whose `train` is a link to a good Dataset folder outside it."""
    path = dataset_dict(tmp_path, ["test"])
    with open(os.path.join(path, "dataset_dict.json"), "w") as f:
        json.dump({"splits": ["train", "test"]}, f)
    os.symlink(folder(tmp_path, name="elsewhere"), os.path.join(path, "train"))
    return path


def duplicate_arrow(tmp_path):
    import pyarrow as pa
    table = pa.Table.from_arrays([pa.array(TEXTS), pa.array(LABELS), pa.array(LABELS)],
                                 names=["text", "label", "label"])
    return folder(tmp_path, files={"data.arrow": arrow_stream(table)})


# --- other files --------------------------------------------------------------------------------

def fifo(tmp_path, name="test.csv"):
    os.mkfifo(tmp_path / name)
    return str(tmp_path / name)


def linked(tmp_path, target, name="test.csv"):
    os.symlink(target, tmp_path / name)
    return str(tmp_path / name)


def sparse_terabyte(tmp_path):
    """A file that says it holds a terabyte of zeros, and takes no room on disk."""
    path = write(tmp_path, "test.csv", "")
    os.truncate(path, 2**40)
    return path


def directory(tmp_path, name="test.csv"):
    (tmp_path / name).mkdir()
    return str(tmp_path / name)


def long_path(tmp_path):
    """An empty CSV 1,000 characters deep: the message shows the path's start and end."""
    deep = tmp_path.joinpath(*["d" * 200] * 4)
    deep.mkdir(parents=True)
    return write(deep, "x" * 200 + ".csv", "")


def foreign_pickle(tmp_path):
    class Run:
        def __reduce__(self):
            return (os.system, ("echo ran",))
    return write(tmp_path, "test.pkl", pickle.dumps(Run()))


DEEP = "[" * 100_000 + "]" * 100_000
NOT_PLAIN = "not plain names of its own files"

MALFORMED = [
    # CSV
    ("csv_more_fields_than_header", file("a.csv", "text,label\nok,1\nx,1,y\n"),
     "line 3 has 3 fields, more than the header's 2"),
    ("csv_trailing_comma_on_rows_only", file("a.csv", "text,label\na,1,\nb,2,\n"),
     "line 2 has 3 fields, more than the header's 2"),
    ("csv_one_column_unquoted_comma", file("a.csv", "text\nfine\nhello, world\n"),
     'line 3 has 2 fields, more than the header\'s 1; quote a text that holds commas ("a, b")'),
    ("csv_line_numbers_count_lines_inside_quotes",
     file("a.csv", 'text,label\n"two\nlines",1\nc,2,3\n'), "line 4 has 3 fields"),
    ("csv_fewer_fields_than_header", file("a.csv", "text,label\na,1\nb\n"),
     "line 3 has 1 fields, fewer than the header's 2"),
    ("csv_empty_line_in_two_columns", file("a.csv", "text,label\na,1\n\nb,2\n"),
     "line 3 has 0 fields, fewer than the header's 2"),
    ("csv_empty", file("a.csv", ""), "it is empty"),
    ("csv_blank_first_line", file("a.csv", "\ntext\na\n"), "its first line is empty"),
    ("csv_unclosed_quote", file("a.csv", 'text\nok\n"never closed\nmore\n'),
     "line 3 is not CSV (unexpected end of data)"),
    ("csv_header_names_text_twice", file("a.csv", "text,label,text\na,1,b\n"),
     "it names its `text` column twice"),
    ("csv_header_names_label_twice", file("a.csv", "label,text,label\n1,a,2\n"),
     "it names its `label` column twice"),
    ("csv_no_text_column", file("a.csv", "body,label\na,1\n"),
     "it has no `text` column (columns: body, label)"),
    ("csv_escape_sequence_in_a_column_name", file("a.csv", "bo\x1b[2Jdy\na\n"),
     r"(columns: 'bo\x1b[2Jdy')"),
    ("csv_newline_in_the_file_name", file("new\nline.csv", ""), r"new\nline.csv: "),
    ("csv_folder_named_csv", directory, "it is not a regular file"),
    ("csv_fifo", fifo, "it is not a regular file"),
    ("csv_link_to_proc_pagemap", lambda p: linked(p, "/proc/self/pagemap"),
     "it holds more bytes than the 0 its size says"),
    ("csv_sparse_terabyte", sparse_terabyte, "it says it holds 1,099,511,627,776 bytes, over the"),
    # JSON lines
    ("jsonl_key_twice", file("a.jsonl", '{"text": "a"}\n{"text": "b", "text": "c"}\n'),
     "line 2 names `text` twice in one object"),
    ("jsonl_label_twice", file("a.jsonl", '{"text": "a", "label": 1, "label": 2}\n'),
     "line 1 names `label` twice in one object"),
    ("jsonl_deep_nesting", file("a.jsonl", '{"text": "a"}\n{"text": %s}\n' % DEEP),
     "line 2 nests values too deeply"),
    ("jsonl_int_over_4300_digits", file("a.jsonl", '{"text": "a", "label": %s}' % ("9" * 5000)),
     "line 1 has a number of over 4,300 digits, past Python's limit for an int"),
    ("jsonl_not_an_object", file("a.jsonl", '{"text": "a"}\n\n["b"]\n'),
     "line 3 is not a JSON object"),
    ("jsonl_not_json", file("a.jsonl", '{"text": "a"}\ntext,label\n'), "line 2 is not JSON"),
    ("jsonl_number_as_text", file("a.jsonl", '{"text": "a"}\n{"text": 12}\n'),
     "row 1 has text 12, not a string"),
    ("jsonl_bool_as_text", file("a.jsonl", '{"text": true}\n'),
     "row 0 has text True, not a string"),
    ("jsonl_no_text_key", file("a.jsonl", '{"body": "a"}\n'), "no line has a `text` key"),
    ("jsonl_escape_sequence_in_a_value", file("a.jsonl", '{"text": ["\\u001b[31mred"]}\n'),
     r"row 0 has text ['\x1b[31mred'], not a string"),
    # parquet
    ("parquet_footer_claims_1e9_rows", parquet_claiming_rows,
     "its footer claims 1,000,000,000 rows, more than a file of 9,"),
    ("parquet_row_groups_disagree_with_the_footer",
     lambda p: parquet_claiming_rows(p, claimed=100, in_row_group=101, rows=100),
     "its footer claims 100 rows, its row groups 101"),
    ("parquet_footer_claims_huge_uncompressed_size", parquet_claiming_size,
     "its footer says its columns take 1,000,000,"),
    ("parquet_more_text_than_its_size", repeated_parquet,
     "more rows or text than its size can honestly hold"),
    ("parquet_garbage", file("a.parquet", b"PAR1" + bytes(range(256)) * 4 + b"PAR1"),
     "not a readable parquet file"),
    ("parquet_truncated", lambda p: write(p, "a.parquet", good_parquet()[:-40]),
     "not a readable parquet file"),
    ("parquet_bad_footer_length",
     lambda p: write(p, "a.parquet", good_parquet()[:-8] + b"\xff\xff\xff\x7fPAR1"),
     "not a readable parquet file"),
    ("parquet_schema_names_text_twice", duplicate_parquet, "it names its `text` column twice"),
    ("parquet_number_as_text",
     lambda p: parquet_of(p, "a.parquet", pyarrow_table({"text": [1, 2]})),
     "row 0 has text 1, not a string"),
    ("parquet_fifo", lambda p: fifo(p, "a.parquet"), "it is not a regular file"),
    # save_to_disk folders
    ("folder_data_file_above_the_folder", naming("../outside.arrow"), NOT_PLAIN),
    ("folder_data_file_absolute", naming("/etc/passwd"), NOT_PLAIN),
    ("folder_data_file_backslash", naming("..\\outside.arrow"), NOT_PLAIN),
    ("folder_data_file_is_a_link", symlinked_data_file, "its data.arrow: it is a symbolic link"),
    ("folder_data_file_missing", naming("nowhere.arrow"), "its nowhere.arrow: cannot open it"),
    ("folder_no_data_files", lambda p: folder(p, state={"_data_files": []}), "names data files []"),
    ("folder_data_files_not_a_list", lambda p: folder(p, state={"_data_files": 7}),
     "names data files []"),
    ("folder_truncated_arrow", truncated_arrow, "its data.arrow is not a readable Arrow stream"),
    ("folder_state_json_not_json", lambda p: folder(p, files={"state.json": "{"}),
     "its state.json is not JSON"),
    ("folder_state_json_not_an_object", lambda p: folder(p, files={"state.json": "[]"}),
     "its state.json is not a JSON object"),
    ("folder_without_dataset_files", lambda p: directory(p, "empty"),
     "it has no state.json or dataset_dict.json"),
    ("folder_dataset_dict_without_train", lambda p: dataset_dict(p, ["test", "validation"]),
     "it is a DatasetDict without a `train` split (splits: test, validation)"),
    ("folder_dataset_dict_train_is_a_link", train_linked_outside,
     "its `train` split is not a folder inside it"),
    ("folder_dataset_dict_split_above_the_folder", lambda p: dataset_dict(p, ["train", "../x"]),
     "not plain folder names"),
    ("folder_schema_names_label_twice", duplicate_arrow, "it names its `label` column twice"),
    # any file
    ("unknown_extension", file("test.txt", "text\na\n"), "unknown kind of input; use .csv"),
    ("no_such_file", lambda p: str(p / "missing"), "no such file or folder"),
    ("nul_in_the_path", lambda p: str(p / "a\0b.csv"),
     r"a\x00b.csv: cannot open it (embedded null"),
    ("pickle_naming_os_system", foreign_pickle, "which no data file needs (nothing was run)"),
    ("long_path", long_path, "xxxxxxxx.csv: not read: it is empty"),
]


@pytest.mark.parametrize("make, phrase", [case[1:] for case in MALFORMED],
                         ids=[case[0] for case in MALFORMED])
def test_every_malformed_file_is_refused_in_one_short_line(tmp_path, make, phrase):
    path = make(tmp_path)
    start = time.perf_counter()
    with pytest.raises(tables.NotReadable) as refused:
        tables.read_table(path)
    seconds = time.perf_counter() - start
    message = str(refused.value)
    assert phrase in message, message
    assert len(message.splitlines()) == 1 and message.isprintable() and len(message) <= 300, message
    assert seconds < 30, seconds


def test_case_ids_are_unique():
    assert len({case[0] for case in MALFORMED}) == len(MALFORMED)


# --- ordinary files: exact texts, labels and order ---------------------------------------------

def test_csv_rows_are_what_a_person_sees(tmp_path):
    rows = 'text,label\n"a, b",World\n"two\nlines",1\n,2\nNA,\n123,+3\n"q""uote",-1\n'
    path = write(tmp_path, "a.csv", rows)
    assert tables.read_table(path) == (["a, b", "two\nlines", "", "NA", "123", 'q"uote'],
                                       ["World", 1, 2, None, 3, -1], [])


def test_csv_of_one_column_counts_every_empty_line_as_a_text(tmp_path):
    path = write(tmp_path, "a.csv", "text\r\nx\r\n\r\n\r\ny\r\n")  # (the final newline ends a row)
    assert tables.read_table(path) == (["x", "", "", "y"], None, [])


def test_csv_with_a_trailing_comma_on_header_and_rows_reads_as_a_person_does(tmp_path):
    path = write(tmp_path, "a.csv", "text,label,\na,1,\nb,2,\n")
    assert tables.read_table(path) == (["a", "b"], [1, 2], [])


def test_csv_bytes_that_are_not_utf8_become_replacement_characters(tmp_path):
    # a byte-order mark, then Latin-1
    path = write(tmp_path, "a.csv", b"\xef\xbb\xbftext,label\ncaf\xe9,0\n\xff,1\n")
    assert tables.read_table(path) == (["caf\ufffd", "\ufffd"], [0, 1], [])


def test_csv_reads_as_pandas_does_on_ag_news(tmp_path):
    import pandas as pd
    real = "/work/shared/data/agnews_dev_train.csv"
    if not os.path.exists(real):
        pytest.skip("no AG News sample here")
    frame = pd.read_csv(real, dtype={"text": str}, na_filter=False).iloc[:2000]
    path = str(tmp_path / "news.csv")
    frame.to_csv(path, index=False)
    assert tables.read_table(path) == (frame.text.tolist(), frame.label.tolist(), [])


def test_jsonl_keeps_only_the_wanted_keys_of_each_line(tmp_path):
    lines = ['{"text": "a", "label": "World", "extra": [1, {"x": 2}]}', "", '{"label": 2}',
             '{"text": null}',
             '{"text": "\\ud800 lone", "label": 2.0}']
    path = write(tmp_path, "a.jsonl", "\n".join(lines) + "\n")
    texts, labels, warnings = tables.read_table(path)
    assert texts == ["a", None, None, "\ud800 lone"]
    assert (labels, warnings) == (["World", 2, None, 2], [])
    assert type(labels[3]) is int  # 2.0 is label 2, as in a pickle


def test_jsonl_with_new_keys_on_every_line_costs_its_size(tmp_path):
    rows = [json.dumps({"text": f"t{i}", **{f"k{i}_{k}": k for k in range(100)}})
            for i in range(5000)]
    path = write(tmp_path, "wide.jsonl", "\n".join(rows))
    # 500,000 keys in all: rows x keys would take minutes, and this allows 3 s
    tight = dict(tables.LIMITS, cpu_s=3, cpu_s_per_mb=0, wall_margin_s=3)
    assert tables.read_table(path, limits=tight) == ([f"t{i}" for i in range(5000)], None, [])


def test_parquet_reads_texts_labels_and_missing_values(tmp_path):
    import pandas as pd
    path = str(tmp_path / "a.parquet")
    pd.DataFrame({"text": ["a", None, "NA", ""], "label": ["World", "Sports", None, "3"],
                  "other": [1, 2, 3, 4]}).to_parquet(path)
    assert tables.read_table(path) == (["a", None, "NA", ""], ["World", "Sports", None, "3"], [])
    path = parquet_of(tmp_path, "many.parquet", pyarrow_table({"text": TEXTS * 500}),
                      row_group_size=300)
    assert tables.read_table(path) == (TEXTS * 500, None, [])


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets
    datasets.disable_progress_bars()
    rows = datasets.Dataset.from_dict({"text": TEXTS * 3, "label": LABELS * 3})
    rows.save_to_disk(str(tmp_path / "ds"), num_shards=2)  # two Arrow files, read in order
    assert tables.read_table(str(tmp_path / "ds")) == (TEXTS * 3, LABELS * 3, [])
    other = datasets.Dataset.from_dict({"text": ["held out"], "label": [0]})
    splits = datasets.DatasetDict({"test": other, "train": rows.select([3, 0])})
    splits.save_to_disk(str(tmp_path / "dsd"))
    train = [TEXTS[3], TEXTS[0]], [LABELS[3], LABELS[0]], []
    assert tables.read_table(str(tmp_path / "dsd")) == train


def test_pickles_are_read_by_read_table_and_read_pickle(tmp_path):
    import gzip
    import pandas as pd
    frame = pd.DataFrame({"text": TEXTS, "label": LABELS})
    path = write(tmp_path, "test.pkl.gz", gzip.compress(pickle.dumps(frame)))
    assert tables.read_table(path) == (TEXTS, LABELS, ["it is gzip-compressed: read decompressed"])
    assert tables.read_pickle(path, columns=("text", "label"))[:2] == (TEXTS, LABELS)


def test_other_column_names(tmp_path):
    path = write(tmp_path, "a.csv", "sentence,y,text\nkept,1,not this\n")
    assert tables.read_table(path, columns=("sentence", "y")) == (["kept"], [1], [])


# Every case has its own test above, on the reader behind both commands; a third of them goes
# through predict.py and another third through train.py, to check each command's one line and exit 2.
@pytest.mark.parametrize("make, phrase", [c[1:] for c in MALFORMED[0::3]], ids=[c[0] for c in MALFORMED[0::3]])
def test_a_malformed_file_ends_predict_in_one_line_and_no_output(trained, tmp_path, capsys, make, phrase):
    path = make(tmp_path)
    out = tmp_path / "never.csv"
    with pytest.raises(SystemExit) as stop:
        predict.main([path, "--checkpoint", trained["out"], "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert (phrase in err or "from the Hugging Face hub" in err) and not out.exists()  # no extension: a hub name


@pytest.mark.parametrize("make, phrase", [c[1:] for c in MALFORMED[1::3]], ids=[c[0] for c in MALFORMED[1::3]])
def test_a_malformed_file_ends_train_in_one_line_and_no_output(model_dirs, tmp_path, capsys, make, phrase):
    path = make(tmp_path)
    with pytest.raises(SystemExit) as stop:
        train.main(["--model", model_dirs["bert"], "--data", path, "--out", str(tmp_path / "run"),
                    "--max-length", "32"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert (phrase in err or "from the Hugging Face hub" in err) and not (tmp_path / "run").exists()


# --- checkpoint.py: a checkpoint from elsewhere is checked before anything is built from it -------

WORDS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"] + [f"w{i}" for i in range(40)]
CLASS_NAMES = ["world", "sports", "business", "sci/tech"]


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
    model, _, new = checkpoint.load_base_model(str(root / "base"), len(CLASS_NAMES))
    inject_lora(model, 2, 4.0, targets=["query", "value"], skip=new)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B" in name or name.startswith("classifier."):
                p.normal_(std=0.5)
    config = {"base_model": str(root / "base"), "labels": CLASS_NAMES, "r": 2, "alpha": 4.0,
              "trained_r": 2, "init": "lora", "dropout": 0.0, "targets": ["query", "value"],
              "max_length": 64}
    checkpoint.save_checkpoint(str(root / "ours"), model, new, config)
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
    "labels-a-1MB-name": (config(labels=["w" * 1_000_000, "b", "c", "d"]), "each printable and of 200 characters"),
    "labels-lone-surrogate": (config(labels=["\ud800", "b", "c", "d"]), "each printable and of 200 characters"),
    "labels-an-escape-code": (config(labels=["\x1b[2J", "b", "c", "d"]), "each printable and of 200 characters"),
    "labels-3-and-03": (config(labels=["3", "03", "c", "d"]), "distinct (3 and 03 are one)"),
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
def base_folder(corrupt_base):
    """A corruption of the base folder the checkpoint names: the checkpoint ships its own copy of
    the base (base_model is a path into it), and that copy is corrupted."""
    def corrupt(folder):
        path = os.path.join(folder, checkpoint.CONFIG_FILE)
        config = json.load(open(path))
        copy = os.path.join(folder, "base")
        shutil.copytree(config["base_model"], copy)
        corrupt_base(copy)
        with open(path, "w") as f:
            json.dump({**config, "base_model": copy}, f)
    return "ours", corrupt


def base_config(**changes):
    return base_folder(edit_json("config.json", **changes))


def base_saved_with(**changes):
    """A base whose weights were saved from a model of another config (then its config put back,
    unless `keep`): weights that are not what the config says, or a consistent smaller model."""
    keep = changes.pop("keep", False)

    def corrupt(copy):
        config = json.load(open(os.path.join(copy, "config.json")))
        other = RobertaConfig(**{**config, **changes})
        RobertaForSequenceClassification(other).base_model.save_pretrained(copy)
        if not keep:
            with open(os.path.join(copy, "config.json"), "w") as f:
                json.dump(config, f)
    return base_folder(corrupt)


def base_without_pad_or_eos(copy):
    path = os.path.join(copy, "tokenizer_config.json")
    config = json.load(open(path))
    for key in ("pad_token", "eos_token"):
        config.pop(key, None)
    with open(path, "w") as f:
        json.dump(config, f)


class RunsACommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def base_pickled_weights(copy):
    """model.safetensors replaced by a pytorch_model.bin, of the weights' size, that runs a command
    when unpickled (a file `ran` would appear beside it)."""
    size = os.path.getsize(os.path.join(copy, "model.safetensors"))
    os.remove(os.path.join(copy, "model.safetensors"))
    command = RunsACommand(f"touch {os.path.join(copy, 'ran')}")
    with open(os.path.join(copy, "pytorch_model.bin"), "wb") as f:
        pickle.dump((command, b"\0" * size), f)


def base_sparse_weights(copy):
    """A config of 1.2 billion parameters beside a 5 GB weight file that holds nothing (sparse)."""
    edit_json("config.json", num_hidden_layers=24, hidden_size=2048, intermediate_size=8192,
              num_attention_heads=16)(copy)
    with open(os.path.join(copy, "model.safetensors"), "r+b") as f:
        f.truncate(5 * 2**30)


def base_tokenizer_edit(change):
    """A corruption of the base's tokenizer.json: change(its JSON) in place."""
    def corrupt(copy):
        path = os.path.join(copy, "tokenizer.json")
        tokenizer = json.load(open(path))
        change(tokenizer)
        with open(path, "w") as f:
            json.dump(tokenizer, f)
    return corrupt


def base_linked_weights(copy):
    """A config of 8 layers of width 1024 (100 million parameters), its weights an empty safetensors
    file beside a link named like a weight file to a large file that holds no weights (transformers
    reads the safetensors file only)."""
    edit_json("config.json", num_hidden_layers=8, hidden_size=1024, num_attention_heads=16,
              intermediate_size=4096)(copy)
    save_file({"dummy": torch.zeros(1)}, os.path.join(copy, "model.safetensors"))
    big = os.path.join(copy, "..", "big.bin")
    with open(big, "wb") as f:
        f.write(b"\1" * 110 * 2**20)  # what a size check that counted every .bin would take for weights
    os.symlink(os.path.abspath(big), os.path.join(copy, "pytorch_model.bin"))


BASE_CASES = {
    "base-config-1.2B": (base_config(num_hidden_layers=24, hidden_size=2048, intermediate_size=8192,
                                     num_attention_heads=16), "describes a model of 1,2"),
    "base-sparse-weights": (base_folder(base_sparse_weights), "weight files hold"),
    "base-tokenizer-beyond-embeddings": (base_saved_with(vocab_size=30, keep=True), "embedding table 30 rows"),
    "base-fewer-positions": (base_saved_with(max_position_embeddings=40, keep=True), "limit of 38 tokens"),
    "base-weights-of-other-shapes": (base_saved_with(intermediate_size=48), "do not fit its config"),
    "base-no-pad-no-eos": (base_folder(base_without_pad_or_eos), "no pad token and no end-of-text"),
    "base-pickled-weights": (base_folder(base_pickled_weights), "UnpicklingError"),
    # the second attacker's finds
    "base-200000-layers": (base_config(num_hidden_layers=200_000, hidden_size=2, num_attention_heads=1,
                                       intermediate_size=1), "200,000 layers"),
    "base-config-nan": (base_folder(edit_json("config.json", layer_norm_eps=float("nan"))), "names NaN"),
    "base-config-a-pipe": (base_folder(lambda copy: os.remove(os.path.join(copy, "config.json"))
                                       or os.mkfifo(os.path.join(copy, "config.json"))), "not a regular file"),
    "base-token-id-beyond-embeddings": (base_folder(base_tokenizer_edit(
        lambda t: t["model"]["vocab"].update(w5=100_000))), "ids up to 100,000"),
    "base-normalizer-doubling-22-times": (base_folder(base_tokenizer_edit(lambda t: t.update(normalizer={
        "type": "Sequence", "normalizers": [{"type": "Replace", "pattern": {"String": "w"}, "content": "ww"}] * 22}))),
        "2,097,152 times longer or more"),
    "base-weights-a-link-to-a-big-file": (base_folder(base_linked_weights), "weight files hold"),
}
CASES.update(BASE_CASES)


# allocating these would take gigabytes (terabytes for PEFT's r): their peak memory is measured
ALLOCATION_CASES = ["r-1e7", "labels-3M", "peft-r-1e9", "peft-head-1e9-rows", "base-config-1.2B",
                    "base-sparse-weights"]


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
    with pytest.raises(data.InputError) as refused:
        checkpoint.load_model(folder)
    seconds = time.perf_counter() - start
    message = str(refused.value)
    assert CASES[case_id][1] in message
    assert seconds < 3, seconds
    assert len(message) <= 400, message[:500]
    assert message.isprintable(), message  # no newline, no escape code: each shown escaped
    assert not os.path.exists(os.path.join(folder, "base", "ran"))  # a pickled base ran nothing


def test_a_checkpoint_that_would_allocate_gigabytes_is_refused_first(valid, tmp_path):
    """Each case: refused, the peak resident memory grown by under 500 MB on the way."""
    for case_id in ALLOCATION_CASES:
        folder = corrupted_copy(valid, tmp_path, case_id)
        grown = peak_growth_kib(lambda: pytest.raises(data.InputError, checkpoint.load_model, folder))
        assert grown < 500 * 1024, f"{case_id}: peak memory grew by {grown // 1024} MB"


@pytest.mark.parametrize("kind", ["ours", "peft"])
def test_a_valid_checkpoint_still_loads_and_predicts(valid, tmp_path, capsys, kind):
    model, tokenizer, config = checkpoint.load_model(valid[kind])
    labels = CLASS_NAMES  # the PEFT export carries them too (auto_mapping's id2label)
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
    assert submitted == [labels[k] for k in expected.argmax(-1).tolist()]  # the class's name
    assert "accuracy" in capsys.readouterr().out  # the per-class report, with string labels


# --- the attacker's finds: each refused in one line, nothing of the user's touched -------------------

def a_state(trained, tmp_path, edit):
    """A copy of the trained run's folder whose last_state.pt `edit` has changed."""
    folder = tmp_path / "hostile_run"
    shutil.copytree(trained["out"], folder)
    state = torch.load(folder / "last_state.pt", weights_only=True)
    state["args"]["out"] = data.short(str(folder), 200)  # as a run in this folder saved it
    edit(state)
    torch.save(state, folder / "last_state.pt")
    return str(folder)


HOSTILE_STATES = {  # last_state.pt with --resume: (the edit, what the one line says)
    "a flag key that is no name": (lambda s: s["args"].update({5: "a"}), "not one train.py wrote"),
    "an RNG state of floats": (lambda s: s["rng"][0].update(cpu=torch.zeros(3)), "does not fit this run"),
    "an optimizer of no groups": (lambda s: s.update(optimizer={"state": {}, "param_groups": []}),
                                  "does not fit this run"),
    "a best without predictions": (lambda s: s.update(best={"tensors": {}}), "not one train.py wrote"),
    "a best of other shapes": (lambda s: s.update(best={**s["best"], "tensors": {
        "classifier.dense.weight": torch.zeros(1)}}), "not one train.py wrote"),
    "a negative step": (lambda s: s.update(step=-7), "not one train.py wrote"),
    "a 100,000-character flag": (lambda s: s["args"].update(model="x" * 100_000), "--model was 'xxxx"),
    "a best of 3 predictions": (lambda s: s["best"].update(predicted=torch.zeros(3, dtype=torch.int64)),
                                "for this model (best)"),
    "a best predicting class 9": (lambda s: s["best"]["predicted"].fill_(9), "for this model (best)"),
    "a best whose loss is text": (lambda s: s["best"].update(val_loss="x"), "for this model (best)"),
    "a best without its macro-F1": (lambda s: s["best"].pop("val_macro_f1"), "for this model (best)"),
}


@pytest.mark.parametrize("case", HOSTILE_STATES)
def test_a_hostile_last_state_is_one_bounded_line(trained, model_dirs, tmp_path, capsys, case):
    edit, message = HOSTILE_STATES[case]
    out = a_state(trained, tmp_path, edit)
    argv = trained["args"]
    with pytest.raises(SystemExit) as stop:
        train.main(["--model", argv.model, "--data", argv.data, "--out", out, "--r", "4", "--alpha", "8",
                    "--lr", "1e-2", "--epochs", "30", "--batch-size", "32", "--val-size", "200",
                    "--eval-every", "20", "--patience", "5", "--max-length", "64", "--log-every", "10",
                    "--precision", "fp32", "--export-peft", argv.export_peft, "--resume"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and message in err, err[:500]
    assert len(err) < 700, len(err)


def test_train_refuses_an_out_folder_of_someone_elses_files_and_links_in_its_own(model_dirs, tmp_path, capsys):
    model_copy = tmp_path / "model"
    shutil.copytree(model_dirs["bert"], model_copy)
    before = (model_copy / "config.json").read_bytes()
    data_csv = write_csv(tmp_path / "t.csv", synthetic_rows(60, seed=2))
    argv = ["--model", str(model_copy), "--data", data_csv, "--max-length", "32", "--val-size", "10",
            "--max-steps", "2", "--precision", "fp32"]
    with pytest.raises(SystemExit) as stop:
        train.main(argv + ["--out", str(model_copy)])  # the model's own folder
    assert stop.value.code == 2 and "holds files that are not a run's" in capsys.readouterr().err
    assert (model_copy / "config.json").read_bytes() == before
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(SystemExit) as stop:
        train.main(argv + ["--out", str(linked)])
    assert stop.value.code == 2 and "metrics.jsonl is a link: it is not written through" in capsys.readouterr().err
    assert victim.read_text() == "precious"
    with pytest.raises(SystemExit) as stop:
        train.main(argv + ["--out", str(tmp_path / "run"), "--export-peft", data_csv])
    assert stop.value.code == 2 and "--export-peft" in capsys.readouterr().err


def test_predict_refuses_an_out_inside_its_input_folder_or_in_no_folder(trained, tmp_path, capsys):
    from datasets import Dataset
    folder = tmp_path / "ds"
    Dataset.from_dict({"text": ["w1 w2", "w3"]}).save_to_disk(str(folder))
    before = (folder / "state.json").read_bytes()
    capsys.readouterr()  # datasets' progress bar
    for out, message in [(folder / "state.json", "is the input (or inside it)"),
                         (tmp_path / "nowhere" / "sub.csv", "its folder does not exist")]:
        with pytest.raises(SystemExit) as stop:
            predict.main([str(folder), "--checkpoint", trained["out"], "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert stop.value.code == 2 and message in err and len(err.splitlines()) == 1, err
    assert (folder / "state.json").read_bytes() == before


@pytest.mark.parametrize("weights", ["missing", "a folder", "a pipe"])
def test_a_peft_adapter_without_a_weights_file_is_one_line(trained, tmp_path, capsys, weights):
    folder = tmp_path / "peft"
    shutil.copytree(trained["peft"], folder)
    path = folder / "adapter_model.safetensors"
    path.unlink()
    if weights == "a folder":
        path.mkdir()
    elif weights == "a pipe":
        os.mkfifo(path)  # opening it would wait for a writer forever
    with pytest.raises(data.InputError) as refused:
        checkpoint.load_model(str(folder))
    assert "not a file of tensors" in str(refused.value)


def test_a_header_of_20000_empty_tensors_is_refused_at_once(trained, tmp_path):
    folder = tmp_path / "many"
    shutil.copytree(trained["out"], folder)
    header = json.dumps({f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
                         for i in range(20_000)}).encode()  # twice the most any adapter holds
    header += b" " * (-len(header) % 8)
    (folder / "adapter.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    start = time.perf_counter()
    with pytest.raises(data.InputError) as refused:
        checkpoint.load_model(str(folder))
    assert "more than any adapter holds" in str(refused.value) and time.perf_counter() - start < 10


def test_names_printed_have_every_unprintable_character_escaped(capsys):
    names = ["evil\u202egnp.exe", "line\u2028sep", "zw\u200bsp", "\u00adsoft"]
    predict.report_classes(torch.tensor([0, 1, 2, 3]), names, names, None, "x")  # no picture
    printed = capsys.readouterr().out
    assert all(c.isprintable() or c == "\n" for c in printed)
    assert "evil\\u202egnp.exe" in printed
    assert data.one_line("a\nb\x1b[2J") == "a\\nb\\x1b[2J"


def test_a_report_of_many_classes_prints_its_accuracy_not_a_matrix_of_their_squares(capsys):
    names = [str(i) for i in range(3000)]
    predict.report_classes(torch.arange(6000) % 3000, list(range(3000)) * 2, names, "/nonexistent/x.png", "x")
    printed = capsys.readouterr().out
    assert printed.startswith("accuracy 1.0000 (6000/6000)") and len(printed) < 200


def test_json_lines_may_repeat_a_key_in_a_nested_object_and_a_separator_is_no_blank_line(tmp_path):
    path = tmp_path / "nested.jsonl"
    path.write_text('{"text": "a", "meta": {"label": 1, "label": 2}}\n{"text": "b"}\n')
    assert tables.read_table(str(path))[:2] == (["a", "b"], None)
    path.write_text('{"text": "a"}\n\x1c\n')
    with pytest.raises(tables.NotReadable) as refused:
        tables.read_table(str(path))
    assert "line 2 is not JSON" in str(refused.value)


def test_ctrl_c_while_predicting_is_one_line_and_leaves_no_file(trained, tmp_path, capsys, monkeypatch):
    def pressed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(predict, "predict_logits", pressed)
    out = tmp_path / "sub.csv"
    with pytest.raises(SystemExit) as stop:
        predict.main([write_csv(tmp_path / "in.csv", synthetic_rows(5, 1)), "--checkpoint", trained["out"],
                      "--out", str(out)])
    assert stop.value.code == 130 and capsys.readouterr().err.strip() == "error: interrupted: nothing was written"
    assert not out.exists() and not list(tmp_path.glob("sub.csv.tmp*"))


def test_a_checkpoint_whose_rank_its_file_does_not_hold_is_refused_before_any_adapter_is_made(
        trained, tmp_path, monkeypatch):
    folder = checkpoint_variant(trained, tmp_path, "r4096", edit_config=lambda c: c.update(
        r=4096, targets=["all-linear"]))  # 24 bytes of config asking for gigabytes of adapters
    monkeypatch.setattr(checkpoint, "inject_lora", lambda *a, **k: pytest.fail("adapters were made"))
    with pytest.raises(data.InputError) as refused:
        checkpoint.load_model(folder)
    assert "do not fit" in str(refused.value) and "with r=4096" in str(refused.value)


def test_a_schedule_is_one_entry_of_schedules_and_argparse_offers_it(monkeypatch):
    monkeypatch.setitem(train.SCHEDULES, "inverse_sqrt", lambda progress: 1 / math.sqrt(1 + 9 * progress))
    for name in train.SCHEDULES:  # each one warms up from 0 to --lr, then never exceeds it
        rates = schedule_of(name, 0.1, 50)
        assert rates[0] == 0 and rates[5] == 1.0 and max(rates) == 1.0, name
        assert train.parse_args(["--schedule", name]).schedule == name
    assert schedule_of("inverse_sqrt", 0.1, 50)[50] == pytest.approx(1 / math.sqrt(10))


def test_string_labels_train_as_class_names_sorted_or_in_label_names_order(model_dirs, tmp_path, capsys):
    names = ["World", "Sports", "Business", "Sci/Tech"]
    rows = [{"text": r["text"], "label": names[r["label"]]} for r in synthetic_rows(80, seed=3)]
    path = write_csv(tmp_path / "named.csv", rows)
    for extra, expected in [([], sorted(names)), (["--label-names", *names], names)]:
        out = tmp_path / f"run{len(extra)}"
        train.main(["--model", model_dirs["bert"], "--data", path, "--out", str(out), "--max-length", "32",
                    "--val-size", "10", "--max-steps", "2", "--precision", "fp32", *extra])
        assert json.load(open(out / "config.json"))["labels"] == expected
    capsys.readouterr()


def test_out_of_memory_while_predicting_is_one_line_naming_the_batch_size(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(predict, "predict_logits", out_of_memory_at_call(predict.predict_logits, 1))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 3 * 2**30)
    out = tmp_path / "sub.csv"
    with pytest.raises(SystemExit) as stop:
        predict.main([write_csv(tmp_path / "in.csv", synthetic_rows(5, 1)), "--checkpoint", trained["out"],
                      "--out", str(out), "--batch-size", "64"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 1 and len(err.splitlines()) == 1 and "--batch-size 64" in err and \
        "use a smaller --batch-size" in err and not out.exists(), err


def test_sigterm_while_writing_the_submission_leaves_no_file(trained, tmp_path, monkeypatch):
    import signal
    real_writer = csv.writer

    class Terminated:  # the submission half written, then SIGTERM (a job scheduler's stop)
        def __init__(self, f, *args, **kwargs):
            self.rows = real_writer(f, *args, **kwargs)

        def writerows(self, rows):
            self.rows.writerows(list(rows)[:2])
            os.kill(os.getpid(), signal.SIGTERM)
    source = write_csv(tmp_path / "in.csv", synthetic_rows(5, 1))
    monkeypatch.setattr(csv, "writer", Terminated)
    previous = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "sub.csv"
    try:
        with pytest.raises(SystemExit) as stop:
            predict.main([source, "--checkpoint", trained["out"], "--out", str(out)])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stop.value.code == 143 and not out.exists() and not list(tmp_path.glob("sub.csv.tmp*"))


# --- issue 29: labels that look like numbers, every file a run writes, the environment, printed names --------

def test_labels_written_as_integers_are_integers_in_every_format(tmp_path):
    rows = [{"text": f"w{i}", "label": str(i % 11)} for i in range(55)]  # "0".."10" as strings, as exporters write
    jsonl = tmp_path / "strings.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from_jsonl = data.labelled_rows(str(jsonl), None, None)
    from_csv = data.labelled_rows(write_csv(tmp_path / "ints.csv", rows), None, None)  # a CSV reads 10 as 10
    assert from_jsonl == from_csv and from_jsonl[2] == [str(k) for k in range(11)]  # classes in number order
    assert from_jsonl[1] == [i % 11 for i in range(55)]
    mixed = tmp_path / "mixed.jsonl"  # 1 and "1" are one class
    mixed.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": "1"}\n{"text": "c", "label": " 0"}\n')
    assert data.labelled_rows(str(mixed), None, None)[1:] == ([1, 1, 0], ["0", "1"])
    mixed.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": "World"}\n')
    with pytest.raises(data.InputError) as refused:
        data.labelled_rows(str(mixed), None, None)
    assert "its labels mix integers (1) and names ('World')" in str(refused.value)
    for names, message in [(["a"] + ["b"] * 10, "the class name 'b' is given twice"),
                           ([str(k) for k in range(10)] + ["x" * 201], "is over 200 characters, and it is the Label"),
                           ([str(k) for k in range(10)] + ["\x1b[2J"], "'\\x1b[2J' is not printable (a control")]:
        with pytest.raises(data.InputError) as refused:
            data.labelled_rows(str(jsonl), names, None)
        assert message in str(refused.value)


def test_the_label_column_is_the_class_name_the_accuracy_true_and_no_old_picture_left(model_dirs, tmp_path, capsys):
    rows = [{**r, "label": str(r["label"] * 3 - (r["label"] == 3))} for r in synthetic_rows(44, seed=9)]
    rows += [{"text": "w1", "label": str(k)} for k in range(11)]  # labels "0".."10", as strings
    source = tmp_path / "numbers.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run, out = tmp_path / "run", tmp_path / "sub.csv"
    run.mkdir()
    stale = b"a picture of an earlier run or submission"  # this one may draw none: no matplotlib, too many classes
    for picture in (run / "curves.png", run / "confusion.png", tmp_path / "sub_confusion.png"):
        picture.write_bytes(stale)
    train.main(["--model", model_dirs["bert"], "--data", str(source), "--out", str(run), "--max-length", "32",
                "--val-size", "10", "--max-steps", "2", "--precision", "fp32", "--lr", "0.1"])
    assert json.load(open(run / "config.json"))["labels"] == [str(k) for k in range(11)]
    capsys.readouterr()
    predict.main([str(source), "--checkpoint", str(run), "--out", str(out)])
    written = [label for _, label in read_submission(out)[1:]]
    right = sum(label == r["label"] for label, r in zip(written, rows))
    assert f"accuracy {right / len(rows):.4f} ({right}/{len(rows)})" in capsys.readouterr().out
    for picture in (run / "curves.png", run / "confusion.png", tmp_path / "sub_confusion.png"):
        assert not picture.exists() or picture.read_bytes() != stale, picture  # drawn anew, or gone


@pytest.mark.parametrize("entry", ["curves.png a link", "confusion.png a folder", "last_state.pt a pipe"])
def test_a_run_folder_whose_files_are_links_pipes_or_folders_is_refused_before_training(model_dirs, tmp_path, capsys,
                                                                                         entry):
    name, kind = entry.split(" ", 1)
    run, victim = tmp_path / "run", tmp_path / "victim.png"
    run.mkdir()
    victim.write_bytes(b"precious")
    {"a link": lambda p: p.symlink_to(victim), "a folder": lambda p: p.mkdir(), "a pipe": os.mkfifo}[kind](run / name)
    with pytest.raises(SystemExit) as stop:
        train.main(["--model", model_dirs["bert"], "--data", write_csv(tmp_path / "t.csv", synthetic_rows(30, 2)),
                    "--out", str(run), "--max-length", "32", "--val-size", "10", "--max-steps", "2"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1, err
    assert f"error: --out: {run / name} is {kind}: it is not written through or over" in err
    assert os.listdir(run) == [name] and victim.read_bytes() == b"precious"  # no work began: not even the log


def test_predict_refuses_an_out_that_is_a_link_a_pipe_or_in_the_base_models_folder(valid, tmp_path, capsys,
                                                                                    monkeypatch):
    monkeypatch.setattr(predict, "read_texts", lambda *a: pytest.fail("prediction work began"))
    victim = tmp_path / "victim.csv"
    victim.write_text("precious")
    (tmp_path / "link.csv").symlink_to(victim)
    (tmp_path / "sub_confusion.png").symlink_to(victim)
    os.mkfifo(tmp_path / "pipe.csv")
    base = json.load(open(os.path.join(valid["ours"], "config.json")))["base_model"]
    weights = os.path.join(base, "model.safetensors")
    before = open(weights, "rb").read()
    for out, message in [(tmp_path / "link.csv", "link.csv is a link"), (tmp_path / "pipe.csv", "pipe.csv is a pipe"),
                         (tmp_path / "sub.csv", "sub_confusion.png is a link"),
                         (weights, "is inside the base model's folder")]:
        with pytest.raises(SystemExit) as stop:
            predict.main([write_csv(tmp_path / "in.csv", synthetic_rows(3, 1)), "--checkpoint", valid["ours"],
                          "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert stop.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert victim.read_text() == "precious" and open(weights, "rb").read() == before


def test_write_atomically_writes_no_link_or_folder_and_leaves_the_old_file_when_the_disk_is_full(tmp_path):
    import resource
    import signal
    (tmp_path / "link").symlink_to(tmp_path / "victim")
    (tmp_path / "folder").mkdir()
    for name, what in [("link", "is a link"), ("folder", "is a folder")]:
        with pytest.raises(data.InputError) as refused:
            data.write_atomically(str(tmp_path / name), lambda f: f.write("x"))
        assert what in str(refused.value)
    old = tmp_path / "old.bin"
    old.write_bytes(b"the old file")
    previous, limits = signal.signal(signal.SIGXFSZ, signal.SIG_IGN), resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limits[1]))  # as a full disk: a write fails past 4 KiB
    try:
        with pytest.raises(data.InputError) as refused:
            data.write_atomically(str(old), lambda f: f.write(b"x" * 10_000), mode="wb")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    assert str(refused.value).startswith(f"cannot write {old} (File too large); the file there before is kept")
    assert old.read_bytes() == b"the old file" and sorted(os.listdir(tmp_path)) == ["folder", "link", "old.bin"]
    assert not (tmp_path / "victim").exists()
    for check in (data.refuse_unplain, lambda path: data.write_atomically(path, lambda f: f.write("x"))):
        with pytest.raises(data.InputError) as refused:  # any other error of the file system: one line too
            check(str(tmp_path / "old.bin" / "x"))
        assert str(refused.value).startswith(f"cannot write {tmp_path}/old.bin/x (Not a directory); ")


def test_a_long_legal_out_is_written_and_a_full_disk_is_one_line_keeping_the_old_submission(trained, tmp_path, capsys,
                                                                                            monkeypatch):
    import resource
    import signal
    source = write_csv(tmp_path / "in.csv", synthetic_rows(20, 1))
    out = tmp_path / ("s" * 246 + ".csv")  # 250 characters: legal; its picture's name would not be
    predict.main([source, "--checkpoint", trained["out"], "--out", str(out)])
    assert len(read_submission(out)) == 21 and sorted(os.listdir(tmp_path)) == ["in.csv", out.name]
    assert predict.picture_beside(str(out)) is None and predict.picture_beside("a/b.csv") == "a/b_confusion.png"
    capsys.readouterr()
    before, real = out.read_bytes(), predict.write_atomically

    def on_a_full_disk(*args, **kwargs):
        limits = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16, limits[1]))  # the submission is longer
        try:
            return real(*args, **kwargs)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    monkeypatch.setattr(predict, "write_atomically", on_a_full_disk)
    monkeypatch.setattr(signal, "SIGXFSZ", signal.SIGXFSZ)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        with pytest.raises(SystemExit) as stop:
            predict.main([source, "--checkpoint", trained["out"], "--out", str(out)])
    finally:
        signal.signal(signal.SIGXFSZ, previous)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and "(File too large); the file there before" in err
    assert out.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["in.csv", out.name]


def test_the_report_cuts_long_class_names_and_draws_no_picture_of_many_classes(capsys, monkeypatch):
    drawn = []
    monkeypatch.setattr(predict, "plot_confusion", lambda confusion, names, path: drawn.append(len(names)) or path)
    names = [f"{i:02d}" + "n" * 20_000 for i in range(50)]  # 1 MB of names: a config may hold that
    predict.report_classes(torch.arange(4), names[:4], names, "x.png", "x")
    printed = capsys.readouterr().out
    assert printed.startswith("accuracy 1.0000 (4/4)") and len(printed) < 40_000 and drawn == []
    assert "\n00nnnnnnnnnnnnnnnnnnn...    1.0000" in printed
    predict.report_classes(torch.arange(4), ["0", "1", "2", "3"], [str(i) for i in range(20)], "x.png", "x")
    assert drawn == [20] and "confusion matrix: x.png" in capsys.readouterr().out


@pytest.mark.parametrize("environment", [{"WORLD_SIZE": "abc"}, {"WORLD_SIZE": "0"}, {"WORLD_SIZE": "2"},
                                         {"RANK": "1", "WORLD_SIZE": "1"}, {"LOCAL_RANK": "-1"}])
def test_an_environment_torchrun_did_not_set_is_one_line(model_dirs, tmp_path, capsys, monkeypatch, environment):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as stop:
        train.main(["--model", model_dirs["bert"], "--data", write_csv(tmp_path / "t.csv", synthetic_rows(30, 2)),
                    "--out", str(tmp_path / "run"), "--max-length", "32", "--val-size", "10"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: the environment is not a torchrun process's (") and "torchrun --nproc_per_node" in err
    assert not (tmp_path / "run").exists()


def test_a_base_on_an_unreachable_hub_fails_in_seconds_in_one_line(trained, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants
    folder = checkpoint_variant(trained, tmp_path, "hub", edit_config=lambda c: c.update(base_model="roberta-base"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # HF_HUB_OFFLINE unset...
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # ...and the hub refusing every connection
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    start = time.perf_counter()
    with pytest.raises(SystemExit) as stop:
        predict.main([write_csv(tmp_path / "in.csv", synthetic_rows(3, 1)), "--checkpoint", folder,
                      "--out", str(tmp_path / "sub.csv")])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and "cannot load the model roberta-base" in err, err
    assert time.perf_counter() - start < 15  # not a minute of retries


def test_printed_paths_are_escaped_so_an_out_with_a_newline_forges_no_line(trained, tmp_path, capsys):
    out = tmp_path / "sub\naccuracy 1.0000 (8 of 8).csv"
    predict.main([write_csv(tmp_path / "in.csv", synthetic_rows(8, 1)), "--checkpoint", trained["out"],
                  "--out", str(out)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"wrote 8 predictions to {tmp_path}/sub\\naccuracy 1.0000 (8 of 8).csv"
    assert not any(line.startswith("accuracy 1.0000 (8 of 8)") for line in lines) and out.exists()
    for arg in ["plain", "it's", "a\nb\x1b[2J", "t\u202eab", "é"]:  # a resume command pastes back exactly, on one line
        word = train.shell_word(arg)
        assert word.isprintable() and subprocess.run(["bash", "-c", f"printf %s {word}"], capture_output=True,
                                                     text=True).stdout == arg, word


def test_labels_that_are_not_the_written_class_names_print_no_accuracy(valid, tmp_path, capsys):
    texts = [f"w{i} w{i + 1}" for i in range(8)]
    source = tmp_path / "in.jsonl"
    for labels, accuracy in [([i % 4 for i in range(8)], False), ([CLASS_NAMES[i % 4] for i in range(8)], True)]:
        source.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, labels)))
        predict.main([str(source), "--checkpoint", valid["ours"], "--out", str(tmp_path / "sub.csv")])
        printed = capsys.readouterr()
        assert ("accuracy" in printed.out) == accuracy  # 0 is not "world", the Label written for class 0
        assert accuracy or "some of its labels are not the checkpoint's class names (world, sports" in printed.err


@pytest.fixture
def fake_matplotlib(monkeypatch):
    """matplotlib as far as the pictures use it (it may not be installed): a figure's PNG holds the calls made."""
    class Axes:
        def __init__(self, figure):
            self.figure = figure

        def __getattr__(self, name):
            return lambda *args, **kwargs: self.figure.calls.append((name, args))

    class Figure:
        def __init__(self):
            self.calls = []

        def tight_layout(self):
            pass

        def savefig(self, f, **kwargs):
            with open(f, "wb") if isinstance(f, str) else contextlib.nullcontext(f) as f:
                f.write(repr(self.calls).encode())

    def subplots(rows=1, columns=1, **kwargs):
        figure = Figure()
        return figure, [Axes(figure) for _ in range(columns)] if columns > 1 else Axes(figure)
    pyplot = SimpleNamespace(subplots=subplots, close=lambda figure: None)
    monkeypatch.setitem(sys.modules, "matplotlib", SimpleNamespace(use=lambda backend: None, pyplot=pyplot))
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", pyplot)


def test_curves_skip_the_lines_of_metrics_jsonl_that_are_not_its_rows_and_follow_no_link(tmp_path, fake_matplotlib):
    (tmp_path / "metrics.jsonl").write_text(  # a line cut by a kill, then --resume appending after it
        '{"step": 10, "train_loss": 1.5}\n{"step": 20, "val_acc{"step": 30, "val_accuracy": 0.5}\n[1]\n7\n'
        + "[" * 100_000 + "\n" + '{"step": "x", "train_loss": 1}\n{"step": 40, "train_loss": 0.5}\n')
    assert train.plot_curves(str(tmp_path)) == str(tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_text() == repr([("plot", ((10, 40), (1.5, 0.5))),
                                                          ("set", ()), ("set", ())])
    (tmp_path / "curves.png").unlink()
    (tmp_path / "curves.png").symlink_to(tmp_path / "victim.png")
    with pytest.raises(data.InputError) as refused:
        train.plot_curves(str(tmp_path))
    assert "curves.png is a link" in str(refused.value) and not (tmp_path / "victim.png").exists()


def test_classes_a_checkpoint_could_not_hold_and_hub_labels_of_lists_are_one_line(tmp_path, monkeypatch):
    from datasets import Dataset
    many = write_csv(tmp_path / "many.csv", [{"text": "w1", "label": f"c{i}"} for i in range(10_001)])
    with pytest.raises(data.InputError) as refused:  # a head of 10,001 rows, which predict.py would refuse
        data.labelled_rows(many, None, None)
    assert "10,001 classes, more than 10,000; is `label` the column of classes?" in str(refused.value)
    monkeypatch.setattr(data, "read_dataset", lambda source: Dataset.from_dict({"text": ["a", "b"],
                                                                                "label": [[0, 1], [1]]}))
    with pytest.raises(data.InputError) as refused:
        data.labelled_rows("some/hub_dataset", None, None)
    assert "a label is [0, 1], not a number or a string; give one class a row" in str(refused.value)
    monkeypatch.setattr(data, "read_dataset", lambda source: Dataset.from_dict({"text": ["a", "b"], "label": [1.0, 0.0]}))
    assert data.labelled_rows("some/hub_dataset", None, None)[1:] == ([1, 0], ["0", "1"])  # 1.0 is 1, as in a file
