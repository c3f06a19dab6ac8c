"""How we answer: the base model and the trained adapter, rebuilt as in training, label each text.

    python predict.py test.pkl [--checkpoint checkpoint] [--out submission.csv] [--batch-size 64]

Writes `ID,Label` rows, IDs 0..N-1 in input order; a labelled input's accuracy is printed too.
"""
import argparse
import csv
import itertools
import os
import signal
import sys

import torch

from checkpoint import base_model_of, check_merged_folder, export_merged, load_model
from data import InputError, label_value, one_line, pad_batch, printable, read_texts, refuse_unplain
from data import remove_stale, short, sorted_batches, to_device, tokenize, warn, write_atomically


@torch.inference_mode()
def predict_logits(model, tokens, pad_id, batch_size, device, amp_dtype=None):
    """Logits (N, num_labels) for every text of `tokens`, in input order, in fp32 on the CPU.
    Batches sorted by length pad little; the answers go back to their input rows at the end, so
    that no batch waits for the one before. The model is left in its mode."""
    was_training = model.training
    model.eval()  # no dropout
    batches, outputs = sorted_batches(tokens.lengths, batch_size), []
    for rows in batches:
        input_ids, attention_mask = to_device(device, *pad_batch(tokens, rows, pad_id))
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs.append(model(input_ids=input_ids, attention_mask=attention_mask).logits)
    model.train(was_training)
    logits = torch.empty(len(tokens), model.config.num_labels)
    logits[list(itertools.chain(*batches))] = torch.cat(outputs).float().cpu()
    return logits


def predict(args, device, amp_dtype):
    """(predicted classes, labels or None, class names) for every text of args.input, in input
    order; the submission written to args.out."""
    texts, labels = read_texts(args.input)  # bad input is found before the model is loaded
    model, tokenizer, config = load_model(args.checkpoint, device)
    tokens = tokenize(tokenizer, texts, config["max_length"] or tokenizer.model_max_length)
    logits = predict_logits(model, tokens, tokenizer.pad_token_id, args.batch_size, device,
                            amp_dtype)
    write_submission(args.out, logits, config["labels"], args.probs)  # ID,Label (,probabilities)
    return logits.argmax(-1), labels, config["labels"]


# --- operations: not needed to follow the method --------------------------------------------------
# The command line and the paths it may write; the device and its precision (train.py's too); the
# report on labelled inputs; the one-line error exit.


def main(argv=None):
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that no temporary file is left
    args = parse_args(argv)
    device = pick_device()
    try:
        amp_dtype = pick_precision(device, args.precision)
        if args.export_merged:
            export_merged(args.checkpoint, args.export_merged)
            print(f"merged model (transformers' folder): {one_line(args.export_merged)}")
        if args.text:
            answer_texts(args, device, amp_dtype)
        if args.input is not None:
            predicted, labels, names = predict(args, device, amp_dtype)
    except InputError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted: nothing was written", code=130)
    except torch.OutOfMemoryError:
        fail(f"out of memory on {device} at --batch-size {args.batch_size} (peak "
             f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB); use a smaller --batch-size",
             code=1)
    except BaseException as e:  # the tokenizers library panics (a BaseException) on a bad regex
        if type(e).__name__ != "PanicException":
            raise
        fail(f"the tokenizer failed on a text ({short(e, 100)}): its files are not a tokenizer "
             "to read texts with")
    if args.input is not None:
        report_predictions(args, predicted, labels, names)


def report_predictions(args, predicted, labels, names):
    """What was written; with labels, the accuracy and the classes' report (and picture)."""
    print(f"wrote {len(predicted)} predictions to {one_line(args.out)}")
    remove_stale(picture_beside(args.out) or "")  # it showed another submission
    try:
        if labels is not None:
            report_classes(predicted, labels, names, picture_beside(args.out), args.input)
    except InputError as e:  # the picture could not be written (a full disk)
        fail(str(e))


def write_submission(path, logits, names, probabilities=False):
    """ID,Label rows, IDs 0..N-1 in input order and Label the class's name (for integer labels,
    the integer), written atomically; with --probs one more column per class, named after it, of
    its probability (as many digits as make each row sum to 1 within 1e-5)."""
    refuse_not_numbers(logits)
    header = ["ID", "Label", *(names if probabilities else [])]
    if len(set(header)) < len(header):
        raise InputError(f"--probs: a class name repeats a column of {short(header, 80)}; rename "
                         "the class (--label-names) or drop --probs")
    shares = logits.softmax(-1).tolist() if probabilities else [()] * len(logits)
    rows = ([i, names[k], *(f"{p:.9g}" for p in row)]
            for i, (k, row) in enumerate(zip(logits.argmax(-1).tolist(), shares)))
    write_atomically(path, lambda f: csv.writer(f).writerows([header, *rows]))


def refuse_not_numbers(logits):
    """One line if an answer is NaN or inf (a base whose config or weights hold them): nothing is
    written or printed from it."""
    if not torch.isfinite(logits).all():
        raise InputError("the model's answers are not numbers (NaN or inf): its base model or "
                         "checkpoint is broken; nothing was written")


def answer_texts(args, device, amp_dtype):
    """--text: each text's class name and probability, printed; no file written."""
    model, tokenizer, config = load_model(args.checkpoint, device)
    tokens = tokenize(tokenizer, args.text, config["max_length"] or tokenizer.model_max_length)
    logits = predict_logits(model, tokens, tokenizer.pad_token_id, args.batch_size, device,
                            amp_dtype)
    refuse_not_numbers(logits)
    for text, shares in zip(args.text, logits.softmax(-1)):
        k = int(shares.argmax())
        print(f"{printable(config['labels'][k], 40)}\t{shares[k]:.4f}\t{one_line(text)[:200]}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", nargs="?", help=".pkl (a datasets.Dataset or pandas DataFrame, also "
                   "compressed), .csv, .jsonl or .parquet with a `text` column")
    p.add_argument("--checkpoint", default="checkpoint", help="folder written by train.py --out")
    p.add_argument("--out", default="submission.csv", help="CSV to write (ID,Label)")
    p.add_argument("--probs", action="store_true", help="also a probability column per class")
    p.add_argument("--text", action="append", default=[], help="a text to answer (repeatable): "
                   "its class and probability are printed, no file written")
    p.add_argument("--export-merged", metavar="DIR", default=None, help="write the checkpoint as "
                   "a transformers model folder, adapters merged (pipeline() loads it)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="auto: bf16 where the GPU or CPU computes it natively, else fp16 on CUDA, "
                        "else fp32")
    p.error = fail  # one line, exit code 2
    args = p.parse_args(argv)
    if args.batch_size < 1:
        fail(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.input is None and not args.text and not args.export_merged:
        fail("give an input file to predict (or --text TEXT, or --export-merged DIR)")
    if args.input is not None:
        check_out(args)
    if args.export_merged:
        try:
            check_merged_folder(args.export_merged, args.checkpoint, base_model_of(args.checkpoint),
                                args.input, args.out if args.input is not None else None)
        except InputError as e:
            fail(str(e))
    return args


def pick_device():
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_precision(device, precision="auto"):
    """The autocast dtype for a precision name; None means plain fp32.

    auto: bf16 on GPUs that compute it natively (compute capability 8.0 and up: A100, H100, RTX
    30xx and later), fp16 with a gradient scaler on older ones (T4, V100), where bf16 is only
    emulated and refused; on a CPU, bf16 only where AMX runs bf16 matrix products; else fp32.
    """
    native = device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 0)
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if native else "fp16"
        elif device.type == "cpu" and getattr(torch.cpu, "_is_amx_tile_supported", bool)():
            precision = "bf16"
        else:
            precision = "fp32"
    if precision == "bf16" and not native:  # attention would fall back to its math kernel
        raise InputError("--precision bf16: this GPU only emulates bf16 (compute capability below "
                         "8.0), and its attention kernels would fall back to one whose memory "
                         "grows with the square of the length; use --precision fp16 or auto")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def check_out(args):
    """Refuse, before any work, an --out that would replace the input, a checkpoint file or a
    folder."""
    if "\0" in args.out + args.checkpoint:
        fail("--out or --checkpoint holds a NUL byte; give the real path")
    if "\0" in args.input:  # the reader says so, in its own words
        return
    out = os.path.realpath(args.out)
    if os.path.isdir(out):
        fail(f"--out {args.out} is a folder; give the CSV file to write, e.g. --out submission.csv")
    source = os.path.realpath(args.input)
    if os.path.exists(args.input) and os.path.commonpath([out, source]) == source:
        fail(f"--out {args.out} is the input (or inside it); give another name, e.g. --out "
             "submission.csv")
    if not os.path.isdir(os.path.dirname(out)):
        fail(f"--out {args.out}: its folder does not exist; create it, or write elsewhere")
    folder = os.path.realpath(args.checkpoint)
    if os.path.commonpath([out, folder]) == folder:
        fail(f"--out {args.out} is inside the checkpoint folder {args.checkpoint}; write the "
             "submission elsewhere, e.g. --out submission.csv")
    base = base_model_of(args.checkpoint)
    if base and os.path.isdir(base) and os.path.commonpath([out, os.path.realpath(base)]) == \
            os.path.realpath(base):  # its weights, config or tokenizer would be replaced
        fail(f"--out {args.out} is inside the base model's folder {printable(base, 100)}; write "
             "the submission elsewhere, e.g. --out submission.csv")
    try:  # a link is not written through, a pipe or a folder not replaced
        for path in filter(None, [args.out, picture_beside(args.out)]):
            refuse_unplain(path)
    except InputError as e:
        fail(f"--out: {e}")


MAX_REPORT_CLASSES, MAX_PICTURE_CLASSES = 50, 20  # K x K cells: readable only for a few
NAME_WIDTH = 24  # a class name is cut there for display (a name may have 200 characters)


def report_classes(predicted, labels, names, picture, source):
    """Accuracy: the share of rows whose written Label is their own label; then per-class
    precision/recall/F1 and the confusion matrix (and its picture, to `picture` unless None)."""
    labels = labels_as_classes(labels, names, source)
    if labels is None:
        return
    correct = int((predicted == labels).sum())
    print(f"accuracy {correct / len(labels):.4f} ({correct}/{len(labels)})")
    if len(names) > MAX_REPORT_CLASSES:
        return
    confusion = confusion_matrix(predicted, labels, len(names))
    print(class_report(confusion, names))
    if picture and len(names) <= MAX_PICTURE_CLASSES and plot_confusion(confusion, names, picture):
        print(f"confusion matrix: {one_line(picture)}")


def shown(name, width=NAME_WIDTH):
    """A class name for display: one line, cut to `width` characters."""
    text = one_line(name[:width + 1])
    return text if len(text) <= width else text[:width - 3] + "..."


def confusion_matrix(predicted, labels, num_labels):
    """counts[true class, predicted class], as one bincount of true * K + predicted."""
    flat = torch.bincount(labels * num_labels + predicted, minlength=num_labels ** 2)
    return flat.reshape(num_labels, num_labels)


def class_report(confusion, names):
    """Per class: precision (of what we called it), recall (of what it was), F1, rows; then the
    confusion matrix."""
    hits = confusion.diag().double()
    called, actual = confusion.sum(0).double(), confusion.sum(1).double()
    precision, recall = hits / called.clamp(min=1), hits / actual.clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    names = [shown(n) for n in names]
    width = max(10, *(len(n) for n in names))
    lines = [f"{'class':<{width}} {'precision':>9} {'recall':>7} {'F1':>6} {'rows':>7}"]
    rows = zip(names, precision.tolist(), recall.tolist(), f1.tolist(), actual.tolist())
    for n, p, r, f, a in rows:
        lines.append(f"{n:<{width}} {p:>9.4f} {r:>7.4f} {f:>6.4f} {int(a):>7}")
    lines += ["", "confusion (rows: true class, columns: predicted)",
              f"{'':<{width}} " + " ".join(f"{n[:8]:>8}" for n in names)]
    lines += [f"{n:<{width}} " + " ".join(f"{c:>8}" for c in row)
              for n, row in zip(names, confusion.tolist())]
    return "\n".join(lines)


def picture_beside(out):
    """submission_confusion.png beside submission.csv: named after it, so it replaces no file;
    None if that name would be too long for a file system (255 bytes)."""
    path = os.path.splitext(out)[0] + "_confusion.png"
    return path if len(os.fsencode(os.path.basename(path))) <= 255 else None


def labels_as_classes(labels, names, source):
    """The rows' labels as class numbers: a label is class k when it is what predict() writes
    for k, names[k] (3 and "3" alike, as in training); or None, with a warning, if some are not
    a class's name."""
    index = {label_value(name): k for k, name in enumerate(names)}
    classes = [None if isinstance(y, bool) else index.get(label_value(y)) for y in labels]
    if None in classes:
        listed = ", ".join(shown(n, 12) for n in names[:4]) + (", ..." if len(names) > 4 else "")
        warn(f"{source}: some of its labels are not the checkpoint's class names ({listed}), so "
             "no accuracy is printed")
        return None
    return torch.tensor(classes)


def pyplot():
    """matplotlib's pyplot, drawing to files only; None where matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(plt, fig, path):
    """`fig` laid out and written to `path` as a PNG, atomically, then closed. Returns path."""
    fig.tight_layout()
    write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=100), mode="wb")
    plt.close(fig)
    return path


def plot_confusion(confusion, names, path):
    """The confusion matrix as a picture, each cell's count written in (needs matplotlib)."""
    plt = pyplot()
    if plt is None:
        return None
    k = len(names)
    fig, ax = plt.subplots(figsize=(1.2 * k + 2, 1.2 * k + 1.5))
    ax.imshow(confusion.numpy(), cmap="Blues")
    names = [shown(n) for n in names]
    ax.set(xticks=range(k), yticks=range(k), xticklabels=names, yticklabels=names,
           xlabel="predicted", ylabel="true")
    for (i, j), count in zip(itertools.product(range(k), repeat=2), confusion.flatten().tolist()):
        ax.text(j, i, count, ha="center", va="center")
    return save_figure(plt, fig, path)


def fail(message, code=2):
    """Bad input ends here: one line that says what is wrong and how to fix it, and an exit code."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()
