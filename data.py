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
import io
import itertools
import json
import math
import numbers
import os
import pickle
import pickletools
import random

import numpy as np
import pandas as pd
import torch


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


def encode_chunks(tokenizer, texts, max_length, chunk=8192):
    for start in range(0, len(texts), chunk):
        yield tokenizer(texts[start:start + chunk], truncation=True, max_length=max_length)["input_ids"]


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

    Returns a `datasets.Dataset` (the train split, for hub names), a pandas DataFrame for local
    files, or whatever a .pkl holds.
    """
    ext = os.path.splitext(source)[1].lower()
    if ext and not os.path.isdir(source):
        if ext not in READERS:
            raise DataError(f"{source}: unknown input kind; use .csv, .jsonl, .parquet, .pkl "
                            "or a datasets.save_to_disk folder")
        if not os.path.isfile(source):
            raise DataError(f"{source}: no such file; check the path")
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


READERS = {
    # a CSV's empty field is an empty text, and "NA" is a word, not a missing value
    # (options: chunksize=N reads the file N rows at a time, as predict.py does)
    ".csv": lambda path, **options: pd.read_csv(path, dtype={"text": str}, na_filter=False, **options),
    ".jsonl": lambda path, **options: pd.read_json(path, lines=True, dtype=False, **options),  # "123" stays text
    ".parquet": pd.read_parquet,
    ".pkl": lambda path: read_pickle(path),  # below: a pickle is read as data, never run
}


def columns_of(table, source, first_row=0):
    """The `text` column (and `label`, or None) of a Dataset, DataFrame or dict of columns."""
    names = list(table) if isinstance(table, dict) else list(getattr(table, "column_names", None) or table.columns)
    if "text" not in names:
        listed = ", ".join(n if isinstance(n, str) and n.isprintable() and len(n) <= 40 else short(n, 40)
                           for n in names[:20])
        raise DataError(f"{source}: no `text` column (columns: {listed or 'none'}); "
                        "rename the column that holds the texts to `text`")
    texts = list(table["text"])
    labels = list(table["label"]) if "label" in names else None
    if not texts and not first_row:
        raise DataError(f"{source}: no rows; give a file with at least one text")
    if labels is not None and len(labels) != len(texts):
        raise DataError(f"{source}: {len(texts)} texts but {len(labels)} labels; give one label per text")
    for i, text in enumerate(texts):
        if text is None or (isinstance(text, float) and math.isnan(text)):
            raise DataError(f"{source}: row {first_row + i} has no text (a missing value); fill it in (an empty string is "
                            "fine) or drop that row")
        if not isinstance(text, str):
            raise DataError(f"{source}: row {first_row + i} has text {short(text)}, not a string; fix or drop that row")
    return texts, labels


def class_names(table):
    """Label names when the data carries them (a ClassLabel feature, as on the hub), else None."""
    feature = (getattr(table, "features", None) or {}).get("label")
    return list(feature.names) if hasattr(feature, "names") else None


def load_splits(source, val_size, seed, limit=None):
    """Labelled rows from `source`, split into (train, val) with the seed.

    Returns ((train_texts, train_labels), (val_texts, val_labels), label_names or None).
    With `limit`, a seeded shuffle keeps only the first `limit` rows before the split.
    """
    import datasets

    table = read_table(source)
    names = class_names(table)
    texts, labels = columns_of(table, source)
    if labels is None:
        raise DataError(f"{source}: no `label` column; training needs a label (0..K-1) for every text")
    # datasets' seeded shuffle and split: the same rows as the Trainer + PEFT recipe with that seed
    table = datasets.Dataset.from_dict({"text": texts, "label": labels})
    if limit is not None:
        table = table.shuffle(seed=seed).select(range(min(limit, len(table))))
    if not 0 < val_size < len(table):
        raise DataError(f"--val-size {val_size} must be above 0 and below the {len(table)} rows used; "
                        "lower it or give more data")
    split = table.train_test_split(test_size=val_size, seed=seed)
    train, val = split["train"], split["test"]
    return (list(train["text"]), list(train["label"])), (list(val["text"]), list(val["label"])), names


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


def check_labels(labels, num_labels, source):
    """Every label must be an integer in 0..num_labels-1."""
    for i, label in enumerate(labels):
        if isinstance(label, bool) or not isinstance(label, numbers.Integral) or not 0 <= label < num_labels:
            raise DataError(f"{source}: row {i} has label {short(label)}, outside 0..{num_labels - 1}; "
                            "fix that row or set --num-labels")


def read_texts(source):
    """Texts (and labels, if the file has them, else None) to predict, in input order."""
    return columns_of(read_table(source), source)


def read_text_chunks(source, rows=50_000):
    """(texts, labels or None) of `source`, `rows` at a time, in input order: memory bounded by a chunk.

    CSV, JSON lines and parquet files are read a piece at a time; a pickle or a dataset has to be
    read whole (its rows are then handed out in chunks).
    """
    ext = os.path.splitext(source)[1].lower()
    if ext in (".csv", ".jsonl", ".parquet") and os.path.isfile(source):
        first = 0
        for frame in file_pieces(source, ext, rows):
            texts, labels = columns_of(frame, source, first_row=first)
            first += len(texts)
            yield texts, labels
        if first == 0:
            raise DataError(f"{source}: no rows; give a file with at least one text")
        return
    texts, labels = read_texts(source)
    for start in range(0, len(texts), rows):
        yield texts[start:start + rows], (labels[start:start + rows] if labels is not None else None)


def file_pieces(path, ext, rows):
    """DataFrames of at most `rows` rows from a .csv, .jsonl or .parquet file, in order."""
    if ext in (".csv", ".jsonl"):
        yield from READERS[ext](path, chunksize=rows)
    else:
        import pyarrow.parquet as pq
        for batch in pq.ParquetFile(path).iter_batches(batch_size=rows):
            yield batch.to_pandas()


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


# --- operations: reading a pickle as data, never as code ------------------------------------------
# A pickle is a little program for a stack machine: opcodes push strings, numbers, lists and dicts,
# GLOBAL names any importable function ("os.system", "builtins.eval") and REDUCE calls it. The usual
# pickle.load runs that program, so a downloaded test.pkl can run anything; an allow-list of "safe"
# classes does not help either, since the constructors of numpy, pandas, pyarrow and datasets all
# trust their arguments (some open files, some replay method calls by name).
# So here GLOBAL never finds anything real: every name becomes an inert `Called` record of what the
# pickle asked for (the name, the arguments, and the state BUILD gives it). Python's own Unpickler
# then builds a tree of plain values and records, and runs nothing. `pickle_columns` reads that tree:
# it knows the few shapes a datasets.Dataset, a pandas DataFrame, a list of row dicts and a dict of
# columns take, checks every length, offset and shape against its buffer before reading a byte, and
# returns plain lists of str and int.

class Called:
    """An inert record of a call a pickle asked for: `name` (module.name), `args`, `state`."""
    name = "?"

    def __new__(cls, *args, **kwargs):  # REDUCE, NEWOBJ and OBJ all end here
        record = object.__new__(cls)
        record.args, record.state = args, None
        return record

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):  # BUILD
        self.state = state

    def __setitem__(self, key, value):  # SETITEM(S) on a dict subclass (an OrderedDict, Features)
        self.state = self.state if type(self.state) is dict else {}
        self.state[key] = value


class RecordingUnpickler(pickle.Unpickler):
    """Python's Unpickler, except that every global it asks for is a fresh `Called` subclass."""

    def __init__(self, file):
        super().__init__(file)
        self.names = {}

    def find_class(self, module, name):
        key = f"{module}.{name}"
        if key not in self.names:
            if len(self.names) >= 100:  # a Dataset pickle names about 20
                raise PickleRefused("it names over 100 different functions")
            self.names[key] = type("Called", (Called,), {"name": key})
        return self.names[key]


class PickleRefused(Exception):
    """The pickle is not a table we read: `str(e)` says what it holds, `fix` what to do instead."""

    def __init__(self, message, fix="re-save it with ds.to_parquet('test.parquet') or df.to_csv('test.csv', "
                                    "index=False), or pickle a plain Dataset or DataFrame"):
        super().__init__(message)
        self.fix = fix


def scan_opcodes(raw):
    """Walk the opcodes without running them, tracking how deeply values nest, and refuse what would
    hurt even the recorder: memo slots far past the file's size, data from outside the file, values
    nested so deep that hashing them overflows C's stack, and ints built to collide in a dict."""
    stack, memo = [], {}
    for opcode, arg, _ in pickletools.genops(raw):  # checks every length against the bytes left
        if opcode.name in ("NEXT_BUFFER", "READONLY_BUFFER", "PERSID", "BINPERSID"):
            raise PickleRefused(f"it needs data from outside the file ({opcode.name})")
        if isinstance(arg, int) and not -2**61 < arg < 2**61:  # hash(i) is i mod 2**61 - 1
            raise PickleRefused("it holds an integer too large for a table cell")
        if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):  # the top value, remembered
            slot = len(memo) if arg is None else int(arg)
            if not 0 <= slot <= len(raw):
                raise PickleRefused(f"it asks for memo slot {slot} in a {len(raw)}-byte file")
            memo[slot] = stack[-1]
            continue
        if opcode.name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(int(arg), 0))
            continue
        if opcode.name == "MARK":
            stack.append(None)
            continue
        popped = [0]
        before = list(opcode.stack_before)
        if pickletools.stackslice in before:  # everything down to the mark
            while stack and stack[-1] is not None:
                popped.append(stack.pop())
            stack.pop()
            before = [b for b in before if b not in (pickletools.stackslice, pickletools.markobject)]
        popped += [stack.pop() for _ in before]
        stack += [max(popped) + (len(popped) > 1)] * len(opcode.stack_after)  # a container: one deeper
        if stack and stack[-1] is not None and stack[-1] > 200:
            raise PickleRefused("it nests values over 200 deep")


def read_pickle(path):
    """{'text': [...], 'label': [...] (if any)} from a pickled Dataset, DataFrame, list of row dicts
    or dict of columns. Nothing in the file is run, and no path named in it is opened."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        scan_opcodes(raw)
        tree = RecordingUnpickler(io.BytesIO(raw)).load()
        return pickle_columns(tree, Budget(len(raw)))
    except PickleRefused as e:
        raise DataError(f"{path}: not read: {e}; {e.fix}") from None
    except Exception as e:  # truncated, garbled or inconsistent: all refused the same way
        raise DataError(f"{path}: not a readable table pickle ({type(e).__name__}: {short(e, 100)}); "
                        f"{PickleRefused('').fix}") from None


def short(value, width=60):
    """A repr safe to print on one line: newlines escaped, at most `width` characters."""
    try:
        text = repr(value) if not isinstance(value, BaseException) else str(value)
    except Exception:  # a 5,000-digit int, a value nested too deep: say what it is, not its value
        text = f"<a {type(value).__name__}>"
    text = text.replace("\n", "\\n").replace("\r", "\\r")
    return text if len(text) <= width else text[:width] + "..."


class Budget:
    """How many rows and text bytes a file of `size` bytes may honestly yield.

    Every row needs at least a byte of the file, and text at most 8 bytes per byte of the file
    (more only when one string is shared many times: a memo trick, not data).
    """

    def __init__(self, size):
        self.rows, self.text = size, 8 * size + 2**20

    def take(self, rows, text=0):
        self.rows, self.text = self.rows - rows, self.text - text
        if self.rows < 0 or self.text < 0:
            raise PickleRefused("it decodes to more rows or text than its size can honestly hold")


def call_of(obj):
    """(short name, args, state) of a record; `copyreg._reconstructor(cls, ...)` counts as `cls`."""
    if isinstance(obj, type) and issubclass(obj, Called):  # a class used as a value (pandas.NA)
        return obj.name.rpartition(".")[2], (), None
    if not isinstance(obj, Called):
        return None, (), None
    name, args = obj.name.rpartition(".")[2], obj.args
    if name in ("_reconstructor", "__newobj__", "__newobj_ex__") and args and isinstance(args[0], type) \
            and issubclass(args[0], Called):
        name, args = args[0].name.rpartition(".")[2], args[1:]
    return name, args, obj.state


def pickle_columns(tree, budget):
    """The `text` and `label` columns of whichever table shape the pickle holds."""
    name, args, state = call_of(tree)
    if isinstance(tree, list):  # a list of row dicts
        budget.take(len(tree))
        if not all(type(row) is dict for row in tree):
            raise PickleRefused("it is a list, but not of dicts (one per row)")
        columns = {k: ([plain(row.get(k)) for row in tree] if k in ("text", "label") else None)
                   for k in (tree[0] if tree else {})}
    elif type(tree) is dict:  # a dict of columns
        columns = {k: (values_of(v, budget) if k in ("text", "label") else None) for k, v in tree.items()}
    elif name == "Dataset":
        columns = dataset_columns(state, budget)
    elif name == "DataFrame":
        columns = frame_columns(state, budget)
    else:
        raise PickleRefused(f"it holds {short(tree.name if isinstance(tree, Called) else type(tree).__name__)}, "
                            "not a Dataset, DataFrame, list of row dicts or dict of columns")
    for name in ("text", "label"):
        if name in columns and columns[name] is None:
            raise PickleRefused(f"its `{name}` column has no data")
    for values in columns.values():
        budget.take(0, sum(len(v) for v in values or () if type(v) is str))
    return columns


def values_of(obj, budget):
    """A column as a plain list, from a list, a numpy array, an Arrow array or a pandas array."""
    if type(obj) in (list, tuple):
        budget.take(len(obj))
        return [plain(v) for v in obj]
    name, args, state = call_of(obj)
    if name in ("_reconstruct", "_frombuffer"):
        shape, values = numpy_array(name, args, state, budget)
        if len(shape) != 1:
            raise PickleRefused(f"a column is a numpy array of shape {short(shape)}, not one row per value")
        return values
    if name in ("_restore_array", "chunked_array"):
        return arrow_values(obj, budget)
    if name in ("ArrowStringArray", "ArrowExtensionArray") and type(state) is dict:
        return arrow_values(state.get("_pa_array"), budget)
    if name == "__pyx_unpickle_NDArrayBacked" and type(state) is tuple and len(state) >= 2:
        return values_of(state[1], budget)  # pandas' StringArray: (dtype, numpy object array)
    raise PickleRefused(f"a column is {short(name or type(obj).__name__)}, which is not read here")


def plain(value):
    """A cell as str, int, float or bool; anything else (None, pandas.NA, a record) is missing."""
    return value if type(value) in (str, int, float, bool) else None


def as_bytes(obj, budget):
    """Bytes as a pickle writes them: bytes, bytearray, or (protocol 0-2) bytearray(encode(s, 'latin1')).

    Each buffer read costs its size: one buffer named a thousand times is read at most a few times.
    """
    name, args, _ = call_of(obj)
    for _ in range(2):  # py_buffer(bytearray(...))
        if name in ("py_buffer", "bytearray", "bytes") and len(args) == 1:
            obj = args[0]
            name, args, _ = call_of(obj)
    if name == "encode" and len(args) == 2 and type(args[0]) is str and args[1] in ("latin1", "latin-1"):
        budget.take(0, len(args[0]))
        return args[0].encode("latin-1")
    if type(obj) in (bytes, bytearray):
        budget.take(0, len(obj))
        return bytes(obj)
    raise PickleRefused("a buffer is not plain bytes")


def count(value, what):
    if type(value) is not int or value < 0:
        raise PickleRefused(f"{what} is {short(value)}, not a count")
    return value


# numpy: _reconstruct(ndarray, (0,), b'b') + BUILD (version, shape, dtype, fortran, data), or
# _frombuffer(data, dtype, shape, order). Only integer, bool and object (a list) arrays are read.
def numpy_array(name, args, state, budget):
    if name == "_frombuffer" and len(args) == 4:
        data, dtype, shape, order = args
    elif name == "_reconstruct" and type(state) is tuple and len(state) in (4, 5):
        shape, dtype, fortran, data = state[-4:]
        order = "F" if fortran is True else "C"
    else:
        raise PickleRefused("a numpy array is in an unknown layout")
    if type(shape) is not tuple or len(shape) > 2:
        raise PickleRefused(f"a numpy array has shape {short(shape)}")
    size = math.prod(count(n, "a numpy dimension") for n in shape)
    budget.take(max(size, sum(shape)))
    kind = numpy_dtype(dtype)
    if kind is object:
        if type(data) is not list or len(data) != size:
            raise PickleRefused("a numpy object array's items do not match its shape")
        flat = [plain(v) for v in data]
    else:
        buffer = as_bytes(data, budget)
        if len(buffer) != size * kind.itemsize:
            raise PickleRefused(f"a numpy array of {size} items has {len(buffer)} bytes")
        flat = np.frombuffer(buffer, dtype=kind).tolist()
    if len(shape) == 2:  # a pandas block: one row per column of the frame
        rows, cols = shape
        if order == "F":
            return shape, [flat[r::rows] for r in range(rows)]
        return shape, [flat[r * cols:(r + 1) * cols] for r in range(rows)]
    return shape, flat


def numpy_dtype(obj):
    """np.dtype of a pickled dtype record, if it is an integer, bool or object dtype (else refused)."""
    name, args, state = call_of(obj)
    code = args[0] if name == "dtype" and args and type(args[0]) is str else ""
    order = state[1] if type(state) is tuple and len(state) > 1 and state[1] in ("<", ">", "|", "=") else "|"
    if code in ("O4", "O8"):
        return object
    if len(code) == 2 and code[0] in "iub" and code[1] in "1248":
        return np.dtype(("<" if order in "|=" else order) + code)
    raise PickleRefused(f"a numpy array has dtype {short(code or name)}, which is not read here")


# pyarrow: _restore_array((type, length, null_count, offset, buffers, children, dictionary)),
# chunked_array([arrays], type). Strings: validity bitmap, offsets (int32, or int64 when large), bytes.
ARROW_INTS = {f"{s}int{b}": np.dtype(f"<{s[:1] or 'i'}{b // 8}") for s in ("", "u") for b in (8, 16, 32, 64)}
ARROW_STRINGS = {"string": np.dtype("<i4"), "utf8": np.dtype("<i4"), "large_string": np.dtype("<i8"),
                 "large_utf8": np.dtype("<i8")}


def arrow_values(obj, budget):
    name, args, _ = call_of(obj)
    budget.take(1)  # every array read costs: a chunk list that repeats one array cannot multiply work
    if name == "chunked_array" and args and type(args[0]) is list:
        return [v for chunk in args[0] for v in arrow_values(chunk, budget)]
    if name != "_restore_array" or len(args) != 1 or type(args[0]) is not tuple or len(args[0]) < 6:
        raise PickleRefused(f"an Arrow column is {short(name)}, which is not read here")
    arrow_type, length, _, offset, buffers, children = args[0][:6]
    type_name, type_args, _ = call_of(arrow_type)
    alias = type_args[0] if type_name == "type_for_alias" and type_args and type(type_args[0]) is str else ""
    length, offset = count(length, "an Arrow length"), count(offset, "an Arrow offset")
    budget.take(length)
    if children or type(buffers) is not list or alias not in {**ARROW_INTS, **ARROW_STRINGS}:
        raise PickleRefused(f"an Arrow column has type {short(alias or type_name)}, which is not read here")
    valid = arrow_validity(buffers[0] if buffers else None, offset, length, budget)
    if alias in ARROW_INTS and len(buffers) == 2:
        data = as_bytes(buffers[1], budget)
        width = ARROW_INTS[alias].itemsize
        if len(data) < (offset + length) * width:
            raise PickleRefused(f"an Arrow array of {length} numbers has {len(data)} bytes")
        values = np.frombuffer(data, ARROW_INTS[alias], count=length, offset=offset * width).tolist()
    elif alias in ARROW_STRINGS and len(buffers) == 3:
        values = arrow_strings(as_bytes(buffers[1], budget), as_bytes(buffers[2], budget), ARROW_STRINGS[alias], offset,
                               length, budget)
    else:
        raise PickleRefused(f"an Arrow {alias} array has {len(buffers)} buffers")
    return [v if ok else None for v, ok in zip(values, valid)]


def arrow_validity(bitmap, offset, length, budget):
    """Which of the rows are not null, from Arrow's validity bitmap (None: all are)."""
    if bitmap is None:
        return [True] * length
    bits = np.unpackbits(np.frombuffer(as_bytes(bitmap, budget), np.uint8), bitorder="little")
    if len(bits) < offset + length:
        raise PickleRefused("an Arrow validity bitmap is shorter than its array")
    return bits[offset:offset + length].astype(bool).tolist()


def arrow_strings(offsets, data, offset_type, offset, length, budget):
    """Each string data[ends[i]:ends[i+1]], after checking the offsets lie in order inside data."""
    if len(offsets) < (offset + length + 1) * offset_type.itemsize:
        raise PickleRefused(f"an Arrow string array of {length} rows has too few offsets")
    ends = np.frombuffer(offsets, offset_type, count=length + 1, offset=offset * offset_type.itemsize)
    if ends[0] < 0 or ends[-1] > len(data) or (np.diff(ends) < 0).any():
        raise PickleRefused("an Arrow string array's offsets run outside its data")
    budget.take(0, int(ends[-1] - ends[0]))
    ends = ends.tolist()
    return [data[ends[i]:ends[i + 1]].decode("utf-8") for i in range(length)]


def table_columns(obj, budget):
    """{name: values} of a pickled pyarrow Table: _reconstruct_table([chunked arrays], schema)."""
    name, args, _ = call_of(obj)
    if name != "_reconstruct_table" or len(args) < 2 or type(args[0]) is not list:
        raise PickleRefused(f"a Dataset's table is {short(name)}, which is not read here")
    _, schema_args, _ = call_of(args[1])
    fields = schema_args[0] if schema_args and type(schema_args[0]) is list else []
    names = [call_of(f)[1][0] if call_of(f)[1] else None for f in fields]
    if len(names) != len(args[0]) or not all(type(n) is str for n in names):
        raise PickleRefused("a Dataset's column names do not match its columns")
    return {n: (arrow_values(c, budget) if n in ("text", "label", "indices") else None)
            for n, c in zip(names, args[0])}


def dataset_columns(state, budget):
    """A datasets.Dataset: its in-memory Arrow table, with the row order of `.select`/`.shuffle`."""
    if type(state) is not dict:
        raise PickleRefused("a Dataset without its state")
    data_name, _, data_state = call_of(state.get("_data"))
    if data_name == "MemoryMappedTable":
        raise PickleRefused("this Dataset was pickled straight from the file it maps (loaded from parquet or "
                            "the hub cache), so it holds a path on the machine that made it, not the data",
                            fix="where it was made, write ds.to_parquet('test.parquet'), or pickle an in-memory "
                                "copy: pickle.dump(Dataset.from_dict(ds.to_dict()), f)")
    if data_name != "InMemoryTable" or type(data_state) is not dict:
        raise PickleRefused(f"a Dataset backed by {short(data_name)}, which is not read here")
    columns = table_columns(data_state.get("table"), budget)
    if state.get("_indices") is not None:  # .select()/.shuffle() keep the table and a row mapping
        _, _, index_state = call_of(state["_indices"])
        order = table_columns((index_state or {}).get("table"), budget).get("indices") or []
        rows = len(columns["text"]) if columns.get("text") is not None else 0
        if not all(type(i) is int and 0 <= i < rows for i in order):
            raise PickleRefused("a Dataset's row mapping points outside its table")
        budget.take(len(order) * sum(v is not None for v in columns.values()))
        columns = {k: (None if v is None else [v[i] for i in order]) for k, v in columns.items()}
    return columns


def frame_columns(state, budget):
    """A pandas DataFrame: BlockManager(blocks, axes); each block holds some columns, at `placement`."""
    manager = state.get("_mgr") if type(state) is dict else None
    name, args, _ = call_of(manager)
    if name != "BlockManager" or len(args) != 2 or type(args[1]) is not list or len(args[1]) != 2:
        raise PickleRefused("a DataFrame in a layout this reader does not know (an old pandas?)")
    blocks, (column_index, _) = args
    _, index_args, _ = call_of(column_index)
    index_state = index_args[1] if len(index_args) == 2 and type(index_args[1]) is dict else {}
    names = values_of(index_state.get("data", []), budget)
    columns = {n: None for n in names}
    for block in blocks if type(blocks) is tuple else ():
        for position, values in block_columns(block, len(names), budget):
            if names[position] in ("text", "label"):
                columns[names[position]] = values
    return columns


def block_columns(block, width, budget):
    """(column position, values) of each column that a pandas block holds."""
    name, args, _ = call_of(block)
    if name not in ("_unpickle_block", "new_block") or len(args) < 2:
        raise PickleRefused(f"a DataFrame block is {short(name)}, which is not read here")
    values, placement = args[0], args[1]
    slice_name, slice_args, _ = call_of(placement)
    if slice_name != "slice" or len(slice_args) != 3 or not all(type(a) is int for a in slice_args):
        raise PickleRefused("a DataFrame block's placement is not a slice")
    positions = range(*slice_args)
    if len(positions) > width or not all(0 <= p < width for p in positions):
        raise PickleRefused("a DataFrame block lies outside its frame")
    kind, numpy_args, numpy_state = call_of(values)
    if kind in ("_reconstruct", "_frombuffer"):  # a 2-D numpy block: one row of it per column
        shape, rows = numpy_array(kind, numpy_args, numpy_state, budget)
        if len(shape) != 2 or shape[0] != len(positions):
            raise PickleRefused("a DataFrame block's shape does not match its placement")
        return list(zip(positions, rows))
    if len(positions) != 1:
        raise PickleRefused("a DataFrame extension block spans several columns")
    return [(positions[0], values_of(values, budget))]
