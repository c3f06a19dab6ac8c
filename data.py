"""What a batch is: a few texts' token ids, padded only to about the longest of them.

Every text is tokenized once, truncated, not padded, into one flat int32 array (`Tokens`): 4 bytes
a token, where keeping the tokenizer's output took about 240 (docs/speed.md). A batch is a list of
row numbers; `pad_batch` pads them to the longest (GPU training rounds it up) and masks the padding.
Training batches come from groups of rows of similar length, shuffled; evaluation's are sorted.
"""
import contextlib
import itertools
import math
import os
import random
import re
import reprlib
import stat
import sys

import numpy as np
import torch

TEXT, LABEL = "text", "label"  # the columns read from every input: rename them here
MAX_CHARS_PER_TOKEN = 64  # a bound, not an average: cutting a text there loses no real token


class Tokens:
    """Token ids of many texts in one flat array: text i is ids[starts[i]:starts[i + 1]]."""

    def __init__(self, ids, starts):
        self.ids, self.starts = ids, starts
        self.lengths = np.diff(starts)

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        return self.ids[self.starts[i]:self.starts[i + 1]]


def tokenize(tokenizer, texts, max_length, chunk=8192):
    """Tokens of every text, truncated to max_length, not padded, a chunk of texts at a time. Each
    text is cut at MAX_CHARS_PER_TOKEN a token first: a tokenizer reads it whole to truncate it."""
    cut = max_length * MAX_CHARS_PER_TOKEN
    lengths, ids = [np.zeros(0, np.int64)], [np.zeros(0, np.int32)]
    for start in range(0, len(texts), chunk):
        pieces = [text[:cut] for text in texts[start:start + chunk]]
        encoded = tokenizer(pieces, truncation=True, max_length=max_length)["input_ids"]
        lengths.append(np.fromiter(map(len, encoded), np.int64, len(encoded)))
        flat = itertools.chain.from_iterable(encoded)
        ids.append(np.fromiter(flat, np.int32, int(lengths[-1].sum())))
    starts = np.concatenate([[0], np.cumsum(np.concatenate(lengths))])
    return Tokens(np.concatenate(ids), starts)


def length_grouped_batches(lengths, batch_size, seed, group_batches=64):
    """One epoch of training batches (lists of row numbers) that hold texts of similar length.

    Shuffle all rows, cut them into groups of `group_batches` batches, sort each group by length
    and cut it into batches, then shuffle the batches: the order stays random, the padding small.
    """
    rng = random.Random(seed)
    rows = list(range(len(lengths)))
    rng.shuffle(rows)
    group = batch_size * group_batches
    batches = []
    for start in range(0, len(rows), group):
        chunk = sorted(rows[start:start + group], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def training_batches(lengths, batch_size, seed, epochs):
    """Every epoch's batches, one after another; each epoch in another order (seed + epoch)."""
    for epoch in range(epochs):
        yield from length_grouped_batches(lengths, batch_size, seed + epoch)


def sorted_batches(lengths, batch_size):
    """Batches of row numbers sorted longest first: least padding, and any memory error first."""
    rows = np.argsort(-np.asarray(lengths), kind="stable").tolist()
    return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]


def pad_batch(tokens, rows, pad_id, multiple=1, max_length=math.inf):
    """(input_ids, attention_mask) of tokens[rows], int64: each row padded on the right to the
    longest, whose length is rounded up to a multiple of `multiple` (fewer shapes for a GPU) but
    not past max_length."""
    lengths = tokens.lengths[rows]
    longest = max(1, int(lengths.max()))  # an empty text may make no token: one pad, masked
    width = min(math.ceil(longest / multiple) * multiple, max(longest, max_length))
    mask = np.arange(width) < lengths[:, None]  # True on each row's own tokens
    input_ids = np.full(mask.shape, pad_id, dtype=np.int64)
    input_ids[mask] = np.concatenate([tokens[i] for i in rows])  # row by row, left to right
    return torch.from_numpy(input_ids), torch.from_numpy(mask.astype(np.int64))


# --- operations: not needed to follow the method --------------------------------------------------
# Reading tables (hub names, files, folders) and checking their labels; messages and safe writes.


class InputError(ValueError):
    """Bad input of any kind (data, flags, a checkpoint, the environment): the message says what is
    wrong and how to fix it, in one line."""


def load_splits(args):
    """((train texts, labels), (validation texts, labels), class names) of --data: --limit rows
    kept by a seeded shuffle, then --val-size split off with the seed (the rows datasets' shuffle
    and train_test_split pick), or --val-data, a file of the same classes, as the validation split.
    Class names: --label-names, the data's, or "0".."K-1"."""
    return split(*labelled_rows(args.data, args.label_names, args.num_labels), args)


def split(texts, labels, names, args):
    val_size = 0 if args.val_data else args.val_size
    rows = split_rows(len(texts), val_size, args.seed, args.limit)
    pick = lambda part: ([texts[i] for i in part], [labels[i] for i in part])  # noqa: E731
    validation = validation_rows(args.val_data, names, args.data) if args.val_data else None
    return pick(rows[val_size:]), validation or pick(rows[:val_size]), names


def validation_rows(source, names, data):
    """(texts, labels) of --val-data, whose labels must be classes of --data: one line naming the
    first row whose label is not."""
    try:
        texts, labels, _ = labelled_rows(source, names, len(names))
    except InputError as e:
        if " has label " not in str(e):
            raise
        raise InputError(f"{str(e).split(';')[0]}: --val-data takes the classes of {data} "
                         f"({short(names, 80)}); fix that row") from None
    return texts, labels


def labelled_rows(source, names, num_labels):
    """(texts, labels 0..K-1, class names), every label checked first, in the file's row order;
    string labels are class names (in `names` order, or sorted)."""
    texts, labels = read_table(source)
    if labels is None:
        raise InputError(f"{source}: no `{LABEL}` column; training needs a label for every text")
    names, labels = name_classes(names, num_labels, labels, source)
    return clean_texts(texts, source), labels, names


def split_rows(count, val_size, seed, limit):
    """Row numbers in the order of a seeded permutation (of --limit seeded rows, if given): the
    first val_size are the validation split."""
    rows = np.arange(count)
    if limit is not None:
        rows = np.random.default_rng(seed).permutation(len(rows))[:limit]
    if val_size >= len(rows):  # --val-size is at least 1, or 0 with --val-data
        raise InputError(f"--val-size {val_size} must be below the {len(rows)} rows used"
                         + (f" (--limit {limit})" if limit is not None else "")
                         + "; lower it or use more rows")
    return rows[np.random.default_rng(seed).permutation(len(rows))].tolist()


def read_texts(source):
    """(texts, labels or None) to predict, in input order: a missing text is predicted as ""."""
    texts, labels = read_table(source, missing_ok=True)
    return clean_texts(texts, source), labels


def read_table(source, missing_ok=False):
    """(texts, labels or None) of a .csv, .jsonl, .parquet or .pkl file or a save_to_disk folder
    (read as data in a contained child: tables.py), or of a hub dataset (a ClassLabel's names are
    not read: its labels are the integers, as a CSV of it holds). A missing text (None, NaN) is
    refused naming its row, or with `missing_ok` kept as None."""
    if os.path.exists(source) or os.path.splitext(source)[1]:
        import tables

        try:
            texts, labels, notes = tables.read_table(source, columns=(TEXT, LABEL))
        except tables.NotReadable as e:
            raise InputError(str(e)) from None
        for note in notes:
            warn(f"{source}: {note}")
    else:
        texts, labels = columns_of(read_dataset(source), source)
    if not texts:
        raise InputError(f"{source}: no rows; give a file with at least one text")
    missing = next((i for i, text in enumerate(texts) if text is None), None)
    if missing is not None and not missing_ok:
        raise InputError(f"{source}: row {missing} has no text (a missing value); fill it in (an "
                         "empty string is fine) or drop that row")
    return texts, labels


def read_dataset(source):
    """The train split of a hub dataset (such as ag_news)."""
    import datasets  # only here: it takes a second to import, and most inputs are files

    datasets.logging.set_verbosity_error()  # no retry warnings: the one line below says it all
    import huggingface_hub
    huggingface_hub.logging.set_verbosity_error()
    try:
        return datasets.load_dataset(source, split="train")
    except Exception as e:  # offline, a typo in the name, or the hub down: all end the same way
        raise InputError(f"cannot load the dataset '{source}' from the Hugging Face hub "
                         f"({short(e, 120)}); offline, give a local file (--data train.csv with "
                         "text,label columns) and a local --model folder, with HF_HUB_OFFLINE=1") \
            from None


def columns_of(table, source):
    """(texts, labels or None) of the TEXT and LABEL columns of a hub Dataset."""
    if TEXT not in table.column_names:
        listed = ", ".join(printable(n) for n in table.column_names[:20])
        raise InputError(f"{source}: no `{TEXT}` column (columns: {listed or 'none'}); rename the "
                         f"column that holds the texts to `{TEXT}` (or set data.TEXT)")
    labels = list(table[LABEL]) if LABEL in table.column_names else None
    odd = next((y for y in labels or [] if not isinstance(y, (str, int, float, type(None)))), None)
    if odd is not None:  # a list (several labels a row), a dict: as tables.py refuses in a file
        raise InputError(f"{source}: a label is {short(odd, 40)}, not a number or a string; give "
                         "one class a row")
    return list(table[TEXT]), labels


LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_texts(texts, source):
    """The texts with a missing one (None) as "" and each lone surrogate (half of a UTF-16 pair,
    which no tokenizer encodes) as U+FFFD, with one warning line for each kind of change."""
    missing = replaced = 0
    for i, text in enumerate(texts):
        if text is None:
            texts[i] = ""
            missing += 1
        elif not text.isascii() and LONE_SURROGATE.search(text):
            texts[i] = LONE_SURROGATE.sub("\ufffd", text)
            replaced += 1
    if missing:
        warn(f"{source}: {missing:,} rows have no text (a missing value); each was predicted as an "
             "empty text")
    if replaced:
        warn(f"{source}: {replaced:,} texts held lone surrogates (invalid UTF-16); each became "
             "U+FFFD")
    return texts


def name_classes(names, num_labels, labels, source):
    """(class names, labels as 0..K-1). A label written as a decimal integer ("10", " 3") is that
    integer in every format, as a CSV's cell is. Other string labels are class names: mapped in
    `names` order, or sorted. Integer labels: K is num_labels, else len(names), else the labels'
    own 0..K-1; a class's name is its integer as text, or `names`' (--label-names renames them).
    Both kinds in one file are refused. The names are what predict.py writes as Labels."""
    labels = [label_value(y) for y in labels]
    text = next((y for y in labels if isinstance(y, str)), None)
    number = next((y for y in labels if is_index(y)), None)
    if text is not None and number is not None:
        raise InputError(f"{source}: its labels mix integers ({short(number, 20)}) and names "
                         f"({short(text, 20)}); write every label as a class number 0..K-1, or "
                         "every one as a name")
    if text is not None:
        names = names or sorted(set(labels), key=str)
        index = {name: i for i, name in enumerate(names)}
        unknown = next((i for i, y in enumerate(labels) if y not in index), None)
        if unknown is not None:
            raise InputError(f"{source}: row {unknown} has label {short(labels[unknown])}, not one "
                             f"of the {len(names)} class names; fix that row or --label-names")
        labels = [index[y] for y in labels]
    num_labels = num_labels or (len(names) if names else count_classes(labels, source))
    if num_labels > MAX_CLASSES:  # a head of K rows, and K logits a text; a checkpoint holds 10,000
        raise InputError(f"{source}: {num_labels:,} classes, more than {MAX_CLASSES:,}; is "
                         f"`{LABEL}` the column of classes?")
    if names and len(names) != num_labels:
        raise InputError(f"{len(names)} class names ({short(names)}) for {num_labels} labels; give "
                         "one --label-names name per class (and --num-labels, if given, to match)")
    for i, label in enumerate(labels):
        if not is_index(label) or not 0 <= label < num_labels:
            raise InputError(f"{source}: row {i} has label {short(label)}, outside "
                             f"0..{num_labels - 1}; fix that row or set --num-labels")
    return check_names([str(n) for n in names] if names else None, source) or \
        [str(i) for i in range(num_labels)], labels


MAX_CLASSES = 10_000  # what a checkpoint may hold (checkpoint.MAX_LABELS)
NAME_CHARS = 200  # a class name is each of its rows' Label in a submission: at most this long


def check_names(names, source):
    """`names`, unless one is longer than NAME_CHARS or not printable (a control character or a
    lone surrogate would be written raw to every row of a submission) or names a class another one
    names (3 and "03" are one class): then one line."""
    seen = set()
    for name in names or []:
        if len(name) > NAME_CHARS or not name.isprintable():
            what = f"over {NAME_CHARS} characters" if len(name) > NAME_CHARS else \
                "not printable (a control character, a lone surrogate)"
            raise InputError(f"{source}: the class name {short(name, 40)} is {what}, and it is the "
                             "Label a submission writes; fix that label")
        if label_value(name) in seen:
            raise InputError(f"{source}: the class name {short(name, 40)} is given twice (3 and "
                             "03 are one class); give each class one name")
        seen.add(label_value(name))
    return names


def is_index(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


INTEGER = re.compile(r"\s*[+-]?[0-9]{1,4300}\s*", re.ASCII)  # what tables.py reads as a CSV's int


def label_value(label):
    """A label as every format means it: a string of a decimal integer is that integer, and so is
    a float of one (2.0, as tables.py reads a file's)."""
    if isinstance(label, float) and label.is_integer():
        return int(label)
    return int(label) if isinstance(label, str) and INTEGER.fullmatch(label) else label


def count_classes(labels, source):
    """K, when the labels are exactly the integers 0..K-1; else one line naming what was found."""
    found = set(labels)
    if all(is_index(y) for y in found) and found == set(range(len(found))):
        return len(found)
    shown = ", ".join(short(y, 20) for y in sorted(found, key=lambda y: (str(type(y)), y))[:10])
    raise InputError(f"{source}: labels must be the integers 0..K-1, found {len(found)} distinct: "
                     f"{shown}{', ...' if len(found) > 10 else ''}; map them to 0..K-1 (AG News' "
                     "original CSV numbers its classes 1-4: subtract 1), or pass --num-labels K "
                     "if some classes are absent")


def to_device(device, *tensors):
    """The tensors on the device: on CUDA from pinned memory, so that the copy overlaps the GPU."""
    if device.type == "cuda":
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in tensors)
    return tuple(t.to(device) for t in tensors)


def write_atomically(path, write, mode="w"):
    """write(file) to a temporary file beside `path`, renamed into place: never half a file, never
    through a link. If it cannot be (a link, a folder, a full disk): one InputError line, the old
    file kept and no temporary left. The temporary's name is short and opened from the folder's
    descriptor: a legal path stays legal."""
    folder, name = os.path.split(path)
    tmp, folder_fd = f".{os.urandom(4).hex()}.tmp", None
    try:
        folder_fd = os.open(folder or ".", os.O_RDONLY | os.O_DIRECTORY)
        refuse_unplain(path, folder_fd)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666, dir_fd=folder_fd)
        try:
            text = {"newline": "", "encoding": "utf-8"} if mode == "w" else {}  # in any locale
            with os.fdopen(fd, mode, **text) as f:
                write(f)
            refuse_unplain(path, folder_fd)  # again: it may have been made meanwhile
            os.replace(tmp, name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
        except BaseException:  # a full disk, Ctrl-C, SIGTERM: no temporary is left
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=folder_fd)
            raise
    except OSError as e:
        raise InputError(f"cannot write {printable(path, 100)} ({e.strerror or short(e, 60)}); the "
                         "file there before is kept: free some space, or write elsewhere") from None
    finally:
        if folder_fd is not None:
            os.close(folder_fd)


def remove_stale(path):
    """Remove the regular file at `path`, a picture of an earlier run: this one may draw none (no
    matplotlib, too many classes), and the old one would be read as its own."""
    with contextlib.suppress(OSError):
        if stat.S_ISREG(os.lstat(path).st_mode):
            os.remove(path)


def refuse_unplain(path, folder_fd=None):
    """One InputError line if `path` (from the folder `folder_fd`, if given) is a link or not a
    regular file; nothing if it is absent."""
    name = path if folder_fd is None else os.path.basename(path)
    try:
        kind = os.stat(name, dir_fd=folder_fd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return
    except OSError as e:  # a name too long, a folder we may not enter
        raise InputError(f"cannot write {printable(path, 100)} ({e.strerror}); write elsewhere") \
            from None
    if not stat.S_ISREG(kind):
        what = {stat.S_IFLNK: "a link", stat.S_IFDIR: "a folder", stat.S_IFIFO: "a pipe"}.get(
            stat.S_IFMT(kind), "not a regular file")
        raise InputError(f"{printable(path, 100)} is {what}: it is not written through or over; "
                         "remove it, or write elsewhere")


def one_line(message):
    """The message as one line: a character that is not printable (a newline, an escape, a
    right-to-left override in a name) is shown escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1]
                   for c in str(message))


def short(value, width=60):
    """A repr of bounded cost, safe to print: a few levels and items deep, at most `width` long."""
    bounded = reprlib.Repr()
    bounded.maxlevel, bounded.maxtuple, bounded.maxlist, bounded.maxdict = 3, 4, 4, 4
    bounded.maxstring = bounded.maxother = bounded.maxlong = width
    try:
        text = str(value)[:4 * width] if isinstance(value, BaseException) else bounded.repr(value)
    except Exception:  # a 5,000-digit int: say what it is, not its value
        text = f"<a {type(value).__name__}>"
    text = one_line(text)
    return text if len(text) <= width else text[:width] + "..."


def printable(name, width=40):
    """A name as it is when it is short and printable, else as a short repr."""
    plain = isinstance(name, str) and name.isprintable() and len(name) <= width
    return name if plain else short(name, width)


def warn(message):
    print(f"warning: {one_line(message)}", file=sys.stderr)
