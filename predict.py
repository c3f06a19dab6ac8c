"""How we answer: rebuild the base model, load the trained adapter, fold it in, label every text.

    python predict.py test.pkl [--checkpoint checkpoint] [--out submission.csv] [--batch-size 64]
                               [--precision auto]

Writes `ID,Label` rows, IDs 0..N-1 in input order. If the input has a `label` column too, prints
the accuracy and, per class, precision, recall, F1 and the confusion matrix. CSV, JSON lines and
parquet inputs are read, tokenized and predicted a chunk at a time, so memory grows with their
length only by the answers kept for the report (a pickle or a dataset is read whole first).
`checkpoint.load_model(folder)` is the one way to get a trained model back.
"""
import argparse
import csv
import itertools
import numbers
import os
import sys

import torch
from torch import nn

from checkpoint import load_model, model_max_length
from data import DataError, one_line, pad_batch, read_text_chunks, sorted_batches, tokenize, warn, write_atomically


@torch.inference_mode()
def predict_logits(model, tokens, pad_id, batch_size, device, amp_dtype=None):
    """Logits (N, num_labels) for every text of `tokens`, in input order.

    Batches are sorted by length so each one pads little; results go back to their input rows.
    The model is left in the mode it was in.
    """
    was_training = model.training
    model.eval()  # no dropout
    logits = torch.empty(len(tokens), model.config.num_labels, device=device)
    for rows in sorted_batches(tokens.lengths, batch_size):
        input_ids, attention_mask = pad_batch(tokens, rows, pad_id)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        logits[torch.tensor(rows, device=device)] = out.float()
    model.train(was_training)
    return logits.cpu()


def main(argv=None):
    args = parse_args(argv)
    device = pick_device()
    amp_dtype = pick_precision(device, args.precision)
    try:
        chunks = read_text_chunks(args.input)
        first = next(chunks)  # bad input is found before the model is loaded
        model, tokenizer, config = load_model(args.checkpoint, device)
        model = cast_frozen_linears(model, amp_dtype)
        max_length = min(config["max_length"], model_max_length(tokenizer))
        answers, labels = [], []  # one tensor of predicted classes per chunk, and its labels (or None)

        def write(f):  # a chunk at a time: tokenize, predict, write its rows
            out = csv.writer(f)
            out.writerow(["ID", "Label"])
            written = 0
            for texts, chunk_labels in itertools.chain([first], chunks):
                tokens = tokenize(tokenizer, texts, max_length, cache=False)
                predicted = predict_logits(model, tokens, tokenizer.pad_token_id, args.batch_size, device,
                                           amp_dtype).argmax(-1)
                out.writerows(enumerate(predicted.tolist(), start=written))
                written += len(predicted)
                answers.append(predicted)
                labels.append(chunk_labels)
        write_atomically(args.out, write)
    except DataError as e:
        fail(str(e))
    predicted = torch.cat(answers)
    print(f"wrote {len(predicted)} predictions to {args.out}")
    if all(chunk is not None for chunk in labels):
        labels = [y for chunk in labels for y in chunk]
        if all(isinstance(y, numbers.Integral) and not isinstance(y, bool) and 0 <= y < len(config["labels"])
               for y in labels):
            report_classes(predicted, torch.tensor(labels), config["labels"], os.path.dirname(os.path.abspath(args.out)))
        else:
            warn(f"{args.input}: its labels are not all integers 0..{len(config['labels']) - 1}, so no accuracy "
                 "is printed")


def report_classes(predicted, labels, names, folder, print_accuracy=True):
    """Accuracy, per-class precision/recall/F1 and the confusion matrix; confusion.png in `folder`."""
    confusion = confusion_matrix(predicted, labels, len(names))
    if print_accuracy:
        correct = int(confusion.diag().sum())
        print(f"accuracy {correct / len(labels):.4f} ({correct}/{len(labels)})")
    print(class_report(confusion, names))
    picture = plot_confusion(confusion, names, os.path.join(folder, "confusion.png"))
    if picture and print_accuracy:
        print(f"confusion matrix: {picture}")
    return picture


def confusion_matrix(predicted, labels, num_labels):
    """counts[true class, predicted class], as one bincount of true * K + predicted."""
    return torch.bincount(labels * num_labels + predicted, minlength=num_labels ** 2).reshape(num_labels, num_labels)


def class_report(confusion, names):
    """Per class: precision (of what we called it), recall (of what it was), F1, rows; then the matrix."""
    hits, called, actual = confusion.diag().double(), confusion.sum(0).double(), confusion.sum(1).double()
    precision, recall = hits / called.clamp(min=1), hits / actual.clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    width = max(10, *(len(n) for n in names))
    lines = [f"{'class':<{width}} {'precision':>9} {'recall':>7} {'F1':>6} {'rows':>7}"]
    lines += [f"{n:<{width}} {p:>9.4f} {r:>7.4f} {f:>6.4f} {int(a):>7}"
              for n, p, r, f, a in zip(names, precision.tolist(), recall.tolist(), f1.tolist(), actual.tolist())]
    lines += ["", "confusion (rows: true class, columns: predicted)",
              f"{'':<{width}} " + " ".join(f"{n[:8]:>8}" for n in names)]
    lines += [f"{n:<{width}} " + " ".join(f"{c:>8}" for c in row) for n, row in zip(names, confusion.tolist())]
    return "\n".join(lines)


# --- operations: not needed to follow the method --------------------------------------------------
# The command line, the device and precision (train.py uses them too), the confusion picture, and the
# one-line error exit.

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help=".pkl (datasets.Dataset or pandas DataFrame, also compressed), .csv, .jsonl or "
                                 ".parquet with a `text` column")
    p.add_argument("--checkpoint", default="checkpoint", help="folder written by train.py --out")
    p.add_argument("--out", default="submission.csv", help="CSV to write (ID,Label)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="auto: bf16 where the GPU or CPU runs it in hardware, else fp16 on CUDA, else fp32")
    p.error = fail  # one line, exit code 2
    args = p.parse_args(argv)
    if args.batch_size < 1:
        fail(f"--batch-size must be at least 1, got {args.batch_size}")
    return args


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


def cast_frozen_linears(model, dtype):
    """Keep frozen nn.Linear layers in the autocast dtype, so autocast need not cast them each call.

    Autocast runs every Linear in `dtype` anyway: casting the frozen weights once gives the same
    numbers without copying them at every step. (Adapters merged after this cast are rounded to the
    base's dtype once: LoRALinear.merge.)
    """
    if dtype is not None:
        for module in model.modules():
            if isinstance(module, nn.Linear) and not module.weight.requires_grad:
                module.to(dtype)
    return model


def plot_confusion(confusion, names, path):
    """confusion.png: the matrix as a picture, each cell's count written in (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 1.2 * len(names) + 1.5))
    ax.imshow(confusion.numpy(), cmap="Blues")
    ax.set(xticks=range(len(names)), yticks=range(len(names)), xticklabels=names, yticklabels=names,
           xlabel="predicted", ylabel="true")
    for (i, j), count in zip(itertools.product(range(len(names)), repeat=2), confusion.flatten().tolist()):
        ax.text(j, i, count, ha="center", va="center")
    fig.tight_layout()
    write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=100), mode="wb")
    plt.close(fig)
    return path


def fail(message, code=2):
    """Bad input ends here: one line that says what is wrong and how to fix it, and a non-zero exit."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()
