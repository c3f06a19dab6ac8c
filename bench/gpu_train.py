"""train.py and predict.py run whole, as a user runs them: two checks, one JSON line each.

    python bench/gpu_train.py compile --tokenizer MINILM_DIR --data DATA/agnews_dev_train.csv
    python bench/gpu_train.py agreement --model MINILM_DIR --data DATA/agnews_dev_train.csv
    (--tiny on either: a CPU dry run, fp32; compile's model is then 2 layers of width 32)

compile: does `train.py --compile --grad-accum 2` train, or fail how? A RoBERTa-base-shaped model
(random weights from its config, every dropout 0, saved with MiniLM's tokenizer, which pads with
id 1 as RoBERTa does) trains --steps steps of 32 rows in two pieces (torch.compile's default mode:
train.compile_options takes no CUDA graphs with --grad-accum), then the same run without --compile
as the reference. Max length 32: every piece is one width, so one graph (AG News texts are longer).
Per run: the exit code, the training loss every 2 steps, the validation accuracy, whether every
loss is finite, the recompiles and graph breaks torch logged (TORCH_LOGS), the last error line;
then the largest gap between the two runs' losses (no dropout: only rounding and kernel choices
differ).

agreement: does predict.py compute what validation computed? A short train.py run (in this
process, so that its own final validation predictions, kept with the restored best adapter, can be
read), then predict.py, in its own process, on the validation rows written to a JSON lines file in
their order, both at --precision (bf16 on a GPU) and batch 64: the two sets of classes should be
identical (the same model form, adapters beside their weights, the same precision and batches).
"""
import argparse
import contextlib
import csv
import json
import math
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def roberta_shaped_folder(folder, tokenizer_dir, tiny):
    """A base-model folder as the hub has roberta-base (the encoder's weights, no head), with
    random weights and no dropout; MiniLM's tokenizer, padding with id 1 ([unused0]), which
    RoBERTa's position ids count from."""
    import torch
    from transformers import AutoTokenizer, RobertaConfig, RobertaModel
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    config = RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                           pad_token_id=1, bos_token_id=0, eos_token_id=2, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0, **(small if tiny else {}))
    torch.manual_seed(0)
    RobertaModel(config, add_pooling_layer=False).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.pad_token = "[unused0]"
    assert tokenizer.pad_token_id == 1, tokenizer.pad_token_id
    tokenizer.save_pretrained(folder)
    return folder


def run_train(argv, out, timeout):
    """train.py in its own process: what its metrics.jsonl and stderr say, and its exit code."""
    env = {**os.environ, "TORCH_LOGS": "recompiles,graph_breaks"}
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *argv, "--out", out],
                              capture_output=True, text=True, timeout=timeout, env=env)
        rc, stderr = done.returncode, done.stderr
    except subprocess.TimeoutExpired as e:
        rc = 124
        stderr = (e.stderr.decode() if isinstance(e.stderr, bytes) else e.stderr or "") \
            + f"\npast its {timeout} s"
    rows = []
    if os.path.exists(os.path.join(out, "metrics.jsonl")):
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    losses = {r["step"]: round(r["train_loss"], 4) for r in rows if "train_loss" in r}
    accuracies = [r["val_accuracy"] for r in rows if "val_accuracy" in r]
    lines = [line for line in stderr.splitlines() if line.strip() and "it/s]" not in line
             and "s/it]" not in line]
    result = {"rc": rc, "wall_s": round(time.perf_counter() - start, 1), "losses": losses,
              "finite": bool(losses) and all(math.isfinite(v) for v in losses.values()),
              "val_accuracy": round(accuracies[-1], 4) if accuracies else None,
              "recompiles": sum("Recompiling function" in line for line in lines),
              "graph_breaks": sum("Graph break" in line for line in lines)}
    if rc != 0:
        result["error"] = (lines[-1] if lines else "")[-300:]
    return result


def compile_check(cli):
    with tempfile.TemporaryDirectory() as tmp:
        folder = roberta_shaped_folder(os.path.join(tmp, "base"), cli.tokenizer, cli.tiny)
        argv = ["--model", folder, "--data", cli.data, "--limit", str(cli.limit),
                "--val-size", "200", "--max-steps", str(cli.steps), "--log-every", "2",
                "--eval-every", str(max(1, cli.steps // 2)), "--batch-size", "32",
                "--grad-accum", "2", "--max-length", "32", "--dropout", "0", "--lr", "1e-3",
                "--precision", cli.precision]
        line = {"section": "compile", "model": "tiny" if cli.tiny else "roberta-base shape",
                "flags": "--compile --grad-accum 2 --batch-size 32 --max-length 32",
                "steps": cli.steps, "precision": cli.precision}
        line["compiled"] = run_train(argv + ["--compile"], os.path.join(tmp, "compiled"),
                                     cli.timeout)
        line["eager"] = run_train(argv, os.path.join(tmp, "eager"), cli.eager_timeout)
    compiled, eager = line["compiled"]["losses"], line["eager"]["losses"]
    both = [step for step in compiled if step in eager]
    line["max_loss_gap"] = max((abs(compiled[s] - eager[s]) for s in both), default=None)
    line["trains"] = line["compiled"]["rc"] == 0 and line["compiled"]["finite"]
    print(json.dumps(line), flush=True)


def agreement_check(cli):
    import torch

    import data
    import train
    from predict import pick_device
    with tempfile.TemporaryDirectory() as tmp:
        out, rows, preds = (os.path.join(tmp, name) for name in ("run", "val.jsonl", "pred.csv"))
        argv = ["--model", cli.model, "--data", cli.data, "--out", out, "--limit", str(cli.limit),
                "--val-size", str(cli.val_size), "--max-steps", str(cli.steps),
                "--eval-every", str(max(1, cli.steps // 2)), "--max-length", "128",
                "--eval-batch-size", "64", "--precision", cli.precision]
        kept = []  # every best so far, as train.keep_best made it: the last is the one restored
        keep_best = train.keep_best
        train.keep_best = lambda *a: kept.append(keep_best(*a)) or kept[-1]
        line = {"section": "agreement", "model": cli.model,
                "precision": cli.precision, "steps": cli.steps}
        try:
            with contextlib.redirect_stdout(sys.stderr):  # stdout: the JSON line alone
                train.main(argv)
        except SystemExit as e:  # train.py's one-line error, already on stderr
            line["error"] = f"train.py exit {e.code}"
            print(json.dumps(line), flush=True)
            return
        args = train.parse_args(argv)
        _, (texts, labels), _ = data.load_splits(args)
        with open(rows, "w", encoding="utf-8") as f:  # JSON: every text exactly as it was
            f.writelines(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, labels))
        done = subprocess.run([sys.executable, os.path.join(ROOT, "predict.py"), rows,
                               "--checkpoint", out, "--out", preds, "--batch-size", "64",
                               "--precision", cli.precision], capture_output=True, text=True)
        if done.returncode != 0:
            line["error"] = f"predict.py exit {done.returncode}: {done.stderr.strip()[-300:]}"
            print(json.dumps(line), flush=True)
            return
        with open(preds, newline="") as f:
            predicted = [int(r["Label"]) for r in csv.DictReader(f)]
    validation = kept[-1]["predicted"].tolist()
    differ = [i for i, (a, b) in enumerate(zip(validation, predicted)) if a != b]
    labels = torch.tensor(labels)
    device = pick_device()  # what train.py's start_process and predict.py picked
    line.update({"device": torch.cuda.get_device_name() if device.type == "cuda" else device.type,
                 "val_rows": len(validation),
                 "identical": validation == predicted, "differ": len(differ),
                 "differing_rows": differ[:10],
                 "val_accuracy_run": round((torch.tensor(validation) == labels).float().mean()
                                           .item(), 4),
                 "val_accuracy_predict": round((torch.tensor(predicted) == labels).float().mean()
                                               .item(), 4)})
    print(json.dumps(line), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("check", choices=["compile", "agreement"])
    p.add_argument("--data", required=True, help="a text,label CSV (AG News)")
    p.add_argument("--tokenizer", help="compile: a tokenizer folder (MiniLM's will do)")
    p.add_argument("--model", help="agreement: a model folder (MiniLM)")
    p.add_argument("--steps", type=int, default=None, help="compile: 12; agreement: 40")
    p.add_argument("--limit", type=int, default=None, help="rows used (compile: 1000; "
                   "agreement: 2000)")
    p.add_argument("--val-size", type=int, default=640, help="agreement: validation rows")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--timeout", type=int, default=90, help="compile: seconds for the compiled run")
    p.add_argument("--eager-timeout", type=int, default=40, help="compile: for the eager run")
    p.add_argument("--tiny", action="store_true", help="a CPU dry run in fp32")
    cli = p.parse_args()
    if cli.tiny:
        cli.precision = "fp32"
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # train.py and predict.py on the CPU, as here
    if cli.check == "compile":
        if not cli.tokenizer:
            p.error("compile needs --tokenizer DIR")
        cli.steps, cli.limit = cli.steps or 12, cli.limit or 1000
        return compile_check(cli)
    if not cli.model:
        p.error("agreement needs --model DIR")
    cli.steps, cli.limit = cli.steps or 40, cli.limit or 2000
    agreement_check(cli)


if __name__ == "__main__":
    main()
