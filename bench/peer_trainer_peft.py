"""The peer to beat: LoRA fine-tuning the way most people do it today, with HF Trainer + PEFT.

It follows the reference recipe (LoRA on query/value with dropout 0.05, classifier head trained,
AdamW with weight decay 0.01, constant LR, dynamic padding, one evaluation per epoch with
early stopping and best-model restore) on a local model and local CSV files (`text,label`,
labels 0..3).

It runs in two phases, each its own process, as train.py and predict.py do, so that
bench/compare.py can time both recipes the same way (whole processes, from the outside):

    python bench/peer_trainer_peft.py train --model DIR --train T.csv --out PEER
    python bench/peer_trainer_peft.py predict --model DIR --eval E.csv --out PEER --preds P.csv

`train` saves the best adapter (and the trained head, PEFT's `modules_to_save`) in PEER/best;
`predict` loads it onto the base model and writes `ID,Label` rows for every row of --eval, in
input order. Each phase prints one JSON line with its own loop time as the Trainer spends it
(`train_loop_s`: inside `trainer.train()`; `predict_loop_s`: inside `trainer.predict()`).

Run it from the project's root, in a throwaway venv that has the project's requirements plus
bench/requirements-peer.txt (it never goes into the project's requirements.txt).
"""
import argparse
import csv
import json
import os
import time

import torch
from datasets import load_dataset
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import (AutoModelForSequenceClassification, AutoTokenizer,
                          DataCollatorWithPadding, EarlyStoppingCallback, Trainer,
                          TrainingArguments)

p = argparse.ArgumentParser()
p.add_argument("phase", choices=["train", "predict"])
p.add_argument("--model", required=True)
p.add_argument("--out", required=True,
               help="Trainer output folder; the best adapter goes to OUT/best")
p.add_argument("--train", help="labelled CSV to train on (train)")
p.add_argument("--eval", help="CSV with a text column to predict (predict)")
p.add_argument("--preds", help="CSV to write, ID,Label (predict)")
p.add_argument("--limit", type=int, default=4000,
               help="training rows used (after a seeded shuffle)")
p.add_argument("--val-size", type=int, default=640)
p.add_argument("--num-labels", type=int, default=4)
p.add_argument("--r", type=int, default=2)
p.add_argument("--alpha", type=float, default=4.0)
p.add_argument("--dropout", type=float, default=0.05)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--epochs", type=int, default=1)
p.add_argument("--weight-decay", type=float, default=0.01)
p.add_argument("--batch-size", type=int, default=32)
p.add_argument("--eval-batch-size", type=int, default=64)
p.add_argument("--max-length", type=int, default=128)
p.add_argument("--seed", type=int, default=42)
p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
               help="mixed precision the Trainer's way (TrainingArguments bf16/fp16); fp32 by "
                    "default")
args = p.parse_args()
if args.phase == "train" and not args.train:
    p.error("train needs --train")
if args.phase == "predict" and not (args.eval and args.preds):
    p.error("predict needs --eval and --preds")
best_dir = os.path.join(args.out, "best")
torch.manual_seed(args.seed)
tok = AutoTokenizer.from_pretrained(args.model)


def encode(ds):
    """Token ids, not padded (the collator pads each batch to its longest): `labels` if labelled."""
    extra = [c for c in ds.column_names if c != "label"]
    ds = ds.map(lambda b: tok(b["text"], truncation=True, max_length=args.max_length),
                batched=True, remove_columns=extra)
    return ds.rename_column("label", "labels") if "label" in ds.column_names else ds


def accuracy(pred):
    return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}


def training_arguments(**more):
    return TrainingArguments(
        output_dir=args.out, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size, report_to=[], seed=args.seed,
        dataloader_num_workers=0, bf16=args.precision == "bf16", fp16=args.precision == "fp16",
        use_cpu=not torch.cuda.is_available(), **more)


if args.phase == "train":
    raw = load_dataset("csv", data_files={"train": args.train})["train"]
    train = raw.shuffle(seed=args.seed).select(range(min(args.limit, len(raw))))
    split = train.train_test_split(test_size=args.val_size, seed=args.seed)
    train_ds, val_ds = encode(split["train"]), encode(split["test"])
    model = AutoModelForSequenceClassification.from_pretrained(args.model,
                                                               num_labels=args.num_labels)
    model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=args.r,
                                             lora_alpha=args.alpha, lora_dropout=args.dropout,
                                             target_modules=["query", "value"]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    targs = training_arguments(
        learning_rate=args.lr, num_train_epochs=args.epochs, weight_decay=args.weight_decay,
        lr_scheduler_type="constant", eval_strategy="epoch", save_strategy="epoch",
        load_best_model_at_end=True, metric_for_best_model="accuracy", save_total_limit=1,
        logging_steps=50)
    trainer = Trainer(model=model, args=targs, train_dataset=train_ds, eval_dataset=val_ds,
                      data_collator=DataCollatorWithPadding(tok), compute_metrics=accuracy,
                      callbacks=[EarlyStoppingCallback(early_stopping_patience=3)])
    t0 = time.perf_counter()
    trainer.train()
    train_loop_s = time.perf_counter() - t0
    trainer.save_model(best_dir)  # the best adapter (restored at the end) and the head
    print(json.dumps({"system": "trainer+peft", "phase": "train",
                      "train_loop_s": round(train_loop_s, 2), "trainable_params": trainable,
                      "train_rows": len(train_ds)}))
else:
    eval_ds = encode(load_dataset("csv", data_files={"eval": args.eval})["eval"])
    eval_ds = eval_ds.remove_columns([c for c in ["labels"] if c in eval_ds.column_names])
    base = AutoModelForSequenceClassification.from_pretrained(args.model,
                                                              num_labels=args.num_labels)
    model = PeftModel.from_pretrained(base, best_dir)
    trainer = Trainer(model=model, args=training_arguments(),
                      data_collator=DataCollatorWithPadding(tok))
    t0 = time.perf_counter()
    out = trainer.predict(eval_ds)
    predict_loop_s = time.perf_counter() - t0
    with open(args.preds, "w", newline="") as f:
        csv.writer(f).writerows([("ID", "Label"), *enumerate(out.predictions.argmax(-1).tolist())])
    print(json.dumps({"system": "trainer+peft", "phase": "predict",
                      "predict_loop_s": round(predict_loop_s, 2), "eval_rows": len(eval_ds)}))
