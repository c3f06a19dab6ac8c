"""What a batch is: a few texts' token ids, padded only as far as the longest of them.

Every text is tokenized once, truncated and not padded. All the token ids live in one flat int32
array, text i at ids[starts[i]:starts[i + 1]] (`Tokens`): 4 bytes a token, where Python lists of
ints took about 240 (bench/memory.py). A batch is a list of row numbers; `pad_batch` pads those rows to the longest
one among them (dynamic padding) and gives the attention mask that hides the padding. Training
batches are cut from groups of rows of similar length, so that little padding is computed, and
shuffled; evaluation and prediction batches are simply sorted by length.

(Why a flat array and not `datasets.map`: both store ids compactly, but `map` caches only for
file-backed datasets and adds a second kind of table to read; the array is the data structure
itself, and `tokenize` caches it on disk, keyed by the texts and the tokenizer.)
"""
import contextlib
import hashlib
import itertools
import json
import math
import numbers
import os
import random
import re
import sys

import numpy as np
import pandas as pd
import torch

import tables
from tables import printable, short

TEXT, LABEL = "text", "label"  # the columns read from every input: rename here if your data names them otherwise


class Tokens:
    """Token ids of many texts in one flat array: text i is ids[starts[i]:starts[i + 1]]."""

    def __init__(self, ids, starts):
        self.ids, self.starts = ids, starts
        self.lengths = np.diff(starts).astype(np.int32)

    def __len__(self):
        return len(self.starts) - 1

    def __getitem__(self, i):
        return self.ids[self.starts[i]:self.starts[i + 1]]


def tokenize(tokenizer, texts, max_length, cache=True):
    """Tokens of every text, truncated to max_length, not padded (with `cache`, kept on disk for next time).

    The fast tokenizer encodes a chunk of texts at a time, in parallel; each chunk is flattened to
    int32 at once, so only one chunk is ever held as Python lists.
    """
    cached = token_cache_path(tokenizer, texts, max_length) if cache else None
    if cached and all(os.path.isfile(cached + end) for end in (".ids.int32", ".starts.npy")):
        return read_token_cache(cached)  # tokenized by an earlier run
    try:
        return store_tokens(encode_chunks(tokenizer, texts, max_length), cached)
    except OSError:  # the cache could not be written (a full disk): keep the tokens in memory instead
        return store_tokens(encode_chunks(tokenizer, texts, max_length), None)


CHARS_PER_TOKEN = 64  # a token covers fewer characters than this, so cutting there changes no token kept


def encode_chunks(tokenizer, texts, max_length, chunk=8192):
    """Token ids of texts, a chunk at a time. Each text is cut at 64 characters a token first: the
    tokenizer encodes the whole text before it truncates, so a 1 MB text would cost what it is long."""
    cut = max_length * CHARS_PER_TOKEN
    for start in range(0, len(texts), chunk):
        yield tokenizer([t[:cut] for t in texts[start:start + chunk]], truncation=True,
                        max_length=max_length)["input_ids"]


def length_grouped_batches(lengths, batch_size, seed, group_batches=64):
    """One epoch of training batches (lists of row numbers) that hold texts of similar length.

    Shuffle all rows, cut them into groups of `group_batches` batches, sort each group by length
    and cut it into batches, then shuffle the batches: the order stays random, the padding small.
    """
    rng = random.Random(seed)
    lengths = list(map(int, lengths))
    rows = list(range(len(lengths)))
    rng.shuffle(rows)
    group = batch_size * group_batches
    batches = []
    for start in range(0, len(rows), group):
        chunk = sorted(rows[start:start + group], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def sorted_batches(lengths, batch_size):
    """Batches of row numbers sorted longest first: least padding, and any memory error comes first."""
    rows = np.argsort(-np.asarray(lengths), kind="stable").tolist()
    return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]


def pad_batch(tokens, rows, pad_id):
    """(input_ids, attention_mask) of tokens[rows], both (len(rows), longest) int64, padded on the right."""
    sequences = [tokens[i] for i in rows]
    longest = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, :len(seq)] = torch.as_tensor(np.asarray(seq, dtype=np.int64))
        attention_mask[row, :len(seq)] = 1
    return input_ids, attention_mask


# --- operations: not needed to follow the method --------------------------------------------------
# Reading tables (hub names, files, folders), checking them, caching tokens, writing files safely.

class DataError(ValueError):
    """Bad input (data, flags or a checkpoint); the message says what is wrong and how to fix it."""


def read_table(source):
    """Rows from a hub dataset name, a .csv/.jsonl/.parquet/.pkl file, or a save_to_disk folder.

    Returns a `datasets.Dataset` (the train split, for hub names and folders), a pandas DataFrame
    (.csv, .parquet) or a dict of columns (.jsonl, .pkl).
    """
    ext = input_kind(source)
    if ext and not os.path.isdir(source):
        if ext not in READERS:
            raise DataError(f"{source}: unknown input kind; use .csv, .jsonl, .parquet, .pkl (also compressed: "
                            ".pkl.gz, .bz2, .xz, .zip) or a datasets.save_to_disk folder")
        if not os.path.exists(source):
            raise DataError(f"{source}: no such file; check the path")
        if not os.path.isfile(source):
            raise DataError(f"{source}: not a regular file (a folder, pipe or device); give the data file itself")
        return READERS[ext](source)
    import datasets  # only here: it takes a second to import, and most inputs are files

    if os.path.isdir(source):
        loaded = datasets.load_from_disk(source)
        return loaded["train"] if isinstance(loaded, datasets.DatasetDict) else loaded
    datasets.logging.set_verbosity_error()  # no retry warnings: the one line below says it all
    import huggingface_hub
    huggingface_hub.logging.set_verbosity_error()
    try:
        return datasets.load_dataset(source, split="train")  # a hub name such as ag_news
    except Exception as e:  # offline, a typo in the name, or the hub down: all end the same way
        raise DataError(f"cannot load the dataset '{source}' from the Hugging Face hub ({short(e, 120)}); offline, "
                        "give a local file (--data train.csv with text,label columns) and a local "
                        "--model folder, and set HF_HUB_OFFLINE=1") from None


def input_kind(source):
    """The file's kind from its name: .csv, .jsonl, .parquet, or .pkl (also test.pkl.gz and the like)."""
    stem, ext = os.path.splitext(source.lower())
    return ".pkl" if ext in (".gz", ".bz2", ".xz", ".zip", ".zst", ".tar") and stem.endswith(".pkl") else ext


def read_pickled_table(path):
    """{'text': [...], 'label': [...] or None} of a pickle, read as data in a child process (tables.py)."""
    try:
        texts, labels, notes = tables.read_pickle(path, columns=(TEXT, LABEL))
    except tables.NotReadable as e:
        raise DataError(str(e)) from None
    for note in notes:
        warn(f"{path}: {note}")
    return {TEXT: texts, **({LABEL: labels} if labels is not None else {})}


def read_jsonl(path, chunksize=None):
    """JSON lines as a dict of columns, or (with chunksize) an iterator of such pieces, in order.

    Read with the json module, so "123" stays text and a \\ud800 escape stays what it is (a lone
    surrogate, made U+FFFD later with a warning), and undecodable bytes become such surrogates too.
    """
    pieces = jsonl_pieces(path, chunksize or math.inf)
    return pieces if chunksize else next(pieces, {})


def jsonl_pieces(path, rows):
    batch = []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    batch.append(json.loads(line))
                except ValueError:
                    raise DataError(f"{path}: line {number} is not JSON; give one JSON object per line") from None
                if not isinstance(batch[-1], dict):
                    raise DataError(f"{path}: line {number} is not a JSON object; give one {{...}} per line")
            if len(batch) >= rows:
                yield {k: [row.get(k) for row in batch] for k in dict.fromkeys(k for row in batch for k in row)}
                batch = []
    if batch:
        yield {k: [row.get(k) for row in batch] for k in dict.fromkeys(k for row in batch for k in row)}


READERS = {
    # a CSV's empty field is an empty text, and "NA" is a word, not a missing value; bytes that
    # are not UTF-8 become U+FFFD (options: chunksize=N reads N rows at a time, as predict.py does)
    ".csv": lambda path, **options: pd.read_csv(path, dtype={TEXT: str}, na_filter=False,
                                                encoding_errors="replace", **options),
    ".jsonl": read_jsonl,
    ".parquet": pd.read_parquet,
    ".pkl": read_pickled_table,  # a pickle is read as data, never run: see pickles.py
}


CONTROL = re.compile("[\x00-\x1f\x7f]")


def one_line(message):
    """The message as one line: a control character (a newline in a file's name) is shown escaped."""
    return CONTROL.sub(lambda m: repr(m.group())[1:-1], str(message))


def warn(message):
    print(f"warning: {one_line(message)}", file=sys.stderr)


def columns_of(table, source, first_row=0, missing_ok=False):
    """The `text` column (and `label`, or None) of a Dataset, DataFrame or dict of columns.

    A missing text (None, NaN) is refused, naming its row; with `missing_ok` it is left None.
    """
    names = list(table) if isinstance(table, dict) else list(getattr(table, "column_names", None) or table.columns)
    if TEXT not in names:
        listed = ", ".join(printable(n) for n in names[:20])
        raise DataError(f"{source}: no `{TEXT}` column (columns: {listed or 'none'}); "
                        f"rename the column that holds the texts to `{TEXT}` (or set data.TEXT)")
    texts = list(table[TEXT])
    labels = list(table[LABEL]) if LABEL in names else None
    if not texts and not first_row:
        raise DataError(f"{source}: no rows; give a file with at least one text")
    if labels is not None and len(labels) != len(texts):
        raise DataError(f"{source}: {len(texts)} texts but {len(labels)} labels; give one label per text")
    for i, text in enumerate(texts):
        if text is None or (isinstance(text, float) and math.isnan(text)):
            if missing_ok:
                texts[i] = None
                continue
            raise DataError(f"{source}: row {first_row + i} has no text (a missing value); fill it in (an empty string is "
                            "fine) or drop that row")
        if not isinstance(text, str):
            raise DataError(f"{source}: row {first_row + i} has text {short(text)}, not a string; fix or drop that row")
    return texts, labels


LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_texts(texts):
    """(texts, missing, replaced): a missing text (None) becomes "", a lone surrogate (half of a UTF-16
    pair, which no tokenizer can encode) becomes U+FFFD; the counts say how many texts changed."""
    missing = replaced = 0
    for i, text in enumerate(texts):
        if text is None:
            texts[i], missing = "", missing + 1
        elif not text.isascii() and LONE_SURROGATE.search(text):
            texts[i], replaced = LONE_SURROGATE.sub("\ufffd", text), replaced + 1
    return texts, missing, replaced


def warn_replaced(source, replaced):
    if replaced:
        warn(f"{source}: {replaced:,} texts held lone surrogates (invalid UTF-16); each became U+FFFD")


def class_names(table):
    """Label names when the data carries them (a ClassLabel feature, as on the hub), else None."""
    feature = (getattr(table, "features", None) or {}).get(LABEL)
    return list(feature.names) if hasattr(feature, "names") else None


def load_splits(source, val_size, seed, limit=None, names=None, num_labels=None):
    """Labelled rows from `source`, split into (train, val) with the seed, and the class names.

    Returns ((train_texts, train_labels), (val_texts, val_labels), names: one per label 0..K-1, given,
    else the data's own, else "0".."K-1"). Every label is checked first, in the file's row order.
    With `limit`, a seeded shuffle keeps only the first `limit` rows before the split.
    """
    table = read_table(source)
    texts, labels = columns_of(table, source)
    if labels is None:
        raise DataError(f"{source}: no `{LABEL}` column; training needs a label (0..K-1) for every text")
    names = name_classes(names or class_names(table), num_labels, labels, source)
    texts, _, replaced = clean_texts(texts)
    warn_replaced(source, replaced)
    # the seeded permutations of datasets' shuffle and train_test_split: the same rows as the
    # Trainer + PEFT recipe with that seed (a test checks it against datasets itself)
    rows = np.arange(len(texts))
    if limit is not None:
        rows = np.random.default_rng(seed).permutation(len(rows))[:limit]
    if not 0 < val_size < len(rows):
        raise DataError(f"--val-size {val_size} must be above 0 and below the {len(rows)} rows used"
                        + (f" (--limit {limit})" if limit is not None else "") + "; lower it or use more rows")
    rows = rows[np.random.default_rng(seed).permutation(len(rows))]
    pick = lambda part: ([texts[i] for i in part], [labels[i] for i in part])  # noqa: E731
    return pick(rows[val_size:].tolist()), pick(rows[:val_size].tolist()), names


def count_classes(labels, source):
    """K, when the labels are exactly the integers 0..K-1; else one line naming what was found."""
    found = set(labels)
    if all(isinstance(y, numbers.Integral) and not isinstance(y, bool) for y in found) \
            and found == set(range(len(found))):
        return len(found)
    shown = ", ".join(short(y, 20) for y in sorted(found, key=lambda y: (str(type(y)), y))[:10])
    raise DataError(f"{source}: labels must be the integers 0..K-1, found {len(found)} distinct: {shown}"
                    f"{', ...' if len(found) > 10 else ''}; map them to 0..K-1 (AG News' original CSV numbers its "
                    "classes 1-4: subtract 1), or pass --num-labels K if some classes are absent")


def name_classes(names, num_labels, labels, source):
    """The class names, one per label 0..K-1 (given, else "0".."K-1"), after checking every label.

    K is num_labels if given, else the number of names, else the labels' own 0..K-1."""
    num_labels = num_labels or (len(names) if names else count_classes(labels, source))
    if names and len(names) != num_labels:
        raise DataError(f"{len(names)} class names ({', '.join(names)}) for {num_labels} labels; give one "
                        "--label-names name per class (and --num-labels, if given, to match)")
    check_labels(labels, num_labels, source)
    return list(names or map(str, range(num_labels)))


def check_labels(labels, num_labels, source):
    """Every label must be an integer in 0..num_labels-1."""
    for i, label in enumerate(labels):
        if isinstance(label, bool) or not isinstance(label, numbers.Integral) or not 0 <= label < num_labels:
            raise DataError(f"{source}: row {i} has label {short(label)}, outside 0..{num_labels - 1}; "
                            "fix that row or set --num-labels")


def read_texts(source):
    """Texts (and labels, if the file has them, else None) to predict, in input order (None: missing)."""
    return columns_of(read_table(source), source, missing_ok=True)


def read_text_chunks(source, rows=50_000):
    """(texts, labels or None) to predict, `rows` at a time, in input order: memory bounded by a chunk.

    CSV, JSON lines and parquet files are read a piece at a time; a pickle or a dataset has to be
    read whole (its rows are then handed out in chunks). A missing text is predicted as an empty
    one; after the last chunk, one warning line counts them (and any lone surrogates replaced).
    """
    ext = input_kind(source)
    if ext in (".csv", ".jsonl", ".parquet") and os.path.isfile(source):
        chunks = file_chunks(source, ext, rows)
    else:
        all_texts, all_labels = read_texts(source)
        chunks = ((all_texts[i:i + rows], all_labels[i:i + rows] if all_labels is not None else None)
                  for i in range(0, len(all_texts), rows))
    total = missing = replaced = 0
    for texts, labels in chunks:
        texts, chunk_missing, chunk_replaced = clean_texts(texts)
        total, missing, replaced = total + len(texts), missing + chunk_missing, replaced + chunk_replaced
        yield texts, labels
    if total == 0:
        raise DataError(f"{source}: no rows; give a file with at least one text")
    if missing:
        warn(f"{source}: {missing:,} rows have no text (a missing value); each was predicted as an empty text")
    warn_replaced(source, replaced)


def file_chunks(path, ext, rows):
    """(texts, labels or None) of a .csv, .jsonl or .parquet file, `rows` at a time, in order."""
    if ext in (".csv", ".jsonl"):
        frames = READERS[ext](path, chunksize=rows)
    else:
        import pyarrow.parquet as pq
        frames = (batch.to_pandas() for batch in pq.ParquetFile(path).iter_batches(batch_size=rows))
    first = 0
    for frame in frames:
        texts, labels = columns_of(frame, path, first_row=first, missing_ok=True)
        first += len(texts)
        yield texts, labels


def token_cache_path(tokenizer, texts, max_length):
    """Where the tokens of these texts by this tokenizer are kept (None: no cache directory)."""
    folder = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lora-textcls")
    key = hashlib.sha256(f"{type(tokenizer).__name__} {max_length} {len(texts)}".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # its vocabulary and rules; not the truncation a previous call left set
        key.update(json.dumps({k: v for k, v in json.loads(backend.to_str()).items()
                               if k not in ("truncation", "padding")}, sort_keys=True).encode())
    else:
        key.update(repr(tokenizer).encode())
    for text in texts:
        key.update(text.encode("utf-8", "surrogatepass") + b"\0")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:
        return None
    return os.path.join(folder, f"tokens-{key.hexdigest()[:32]}")


def store_tokens(chunks, cached):
    """Tokens from chunks of token-id lists, flattened to int32 a chunk at a time: straight into the
    cache file, then mapped back from disk (resident only as batches touch it), or into memory."""
    lengths, in_memory, tmp = [], [], f"{cached}.ids.tmp{os.getpid()}" if cached else None
    try:
        with open(tmp, "wb") if tmp else contextlib.nullcontext() as ids_file:
            for encoded in chunks:
                lengths.append(np.fromiter(map(len, encoded), np.int64, len(encoded)))
                ids = np.fromiter(itertools.chain.from_iterable(encoded), np.int32, int(lengths[-1].sum()))
                ids_file.write(ids.tobytes()) if ids_file else in_memory.append(ids)
        starts = np.concatenate([[0], np.cumsum(np.concatenate(lengths or [np.zeros(0, np.int64)]))])
        if tmp is None:
            return Tokens(np.concatenate(in_memory or [np.zeros(0, np.int32)]), starts)
        os.replace(tmp, cached + ".ids.int32")
        write_atomically(cached + ".starts.npy", lambda f: np.save(f, starts), mode="wb")  # last: the entry is whole
        return read_token_cache(cached)
    finally:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)


def read_token_cache(cached):
    starts = np.load(cached + ".starts.npy")
    ids = np.memmap(cached + ".ids.int32", np.int32, mode="r") if starts[-1] else np.zeros(0, np.int32)
    if len(ids) != starts[-1]:
        raise DataError(f"{cached}: a damaged token cache entry; delete it and run again")
    return Tokens(ids, starts)


def write_atomically(path, write, mode="w"):
    """Call write(file) on a temporary file beside `path`, then rename it into place.

    A crash mid-write leaves the old file (or none), never half a file.
    """
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode, **({"newline": ""} if mode == "w" else {})) as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
