"""What a batch is: tokenized texts, grouped by length, padded only as far as the batch needs.

Texts are tokenized once, without padding. A batch is a list of row indices; `pad_batch` pads its
token lists to the longest one in that batch (dynamic padding). Training batches are drawn from
groups of similar length so little padding is computed; evaluation batches are sorted by length.
"""
import math
import numbers
import os
import pickle
import random

import pandas as pd
import torch


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
    return datasets.load_dataset(source, split="train")  # a hub name such as ag_news


# What a pickled datasets.Dataset, pandas DataFrame or list of dicts needs, and nothing else: a
# pickle names functions to call while loading, and a hostile one names os.system or eval.
PICKLE_ALLOWED = {
    ("builtins", "slice"), ("builtins", "bytearray"), ("__builtin__", "slice"), ("__builtin__", "bytearray"),
    ("_codecs", "encode"), ("collections", "OrderedDict"), ("copyreg", "_reconstructor"), ("builtins", "object"),
    ("numpy", "dtype"), ("numpy", "ndarray"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer"),
    ("pandas", "DataFrame"), ("pandas", "Index"), ("pandas", "RangeIndex"), ("pandas", "StringDtype"),
    ("pandas.core.frame", "DataFrame"), ("pandas.core.indexes.base", "_new_Index"),
    ("pandas.core.indexes.base", "Index"), ("pandas.core.indexes.range", "RangeIndex"),
    ("pandas.core.internals.managers", "BlockManager"), ("pandas.core.internals.blocks", "new_block"),
    ("pandas._libs.internals", "_unpickle_block"), ("pandas.arrays", "ArrowStringArray"),
    ("pandas.core.arrays.string_", "StringDtype"), ("pandas.core.arrays.string_arrow", "ArrowStringArray"),
    ("pyarrow.lib", "_reconstruct_table"), ("pyarrow.lib", "_restore_array"), ("pyarrow.lib", "chunked_array"),
    ("pyarrow.lib", "field"), ("pyarrow.lib", "py_buffer"), ("pyarrow.lib", "schema"),
    ("pyarrow.lib", "type_for_alias"),
    ("datasets.arrow_dataset", "Dataset"), ("datasets.info", "DatasetInfo"),
    ("datasets.table", "InMemoryTable"), ("datasets.table", "MemoryMappedTable"),
    ("datasets.features.features", "Features"), ("datasets.features.features", "Value"),
    ("datasets.features.features", "ClassLabel"), ("datasets.features.features", "Sequence"),
    ("datasets.features.features", "List"), ("datasets.features.features", "LargeList"),
}


class SafeUnpickler(pickle.Unpickler):
    """Loads data pickles; refuses, before calling it, anything not in PICKLE_ALLOWED."""

    def find_class(self, module, name):
        if (module, name) not in PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name}")
        return super().find_class(module, name)


def read_pickle(path):
    try:
        with open(path, "rb") as f:
            return SafeUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{path}: refused to load: this pickle calls {e}, which a Dataset or DataFrame never "
                        "needs (nothing was run); save the data as .csv or .parquet instead") from None
    except Exception as e:  # a truncated or garbled file
        raise DataError(f"{path}: not a readable pickle ({type(e).__name__}: {e}); re-save it with "
                        "pickle.dump or use .csv or .parquet") from None


READERS = {
    # a CSV's empty field is an empty text, and "NA" is a word, not a missing value
    ".csv": lambda path: pd.read_csv(path, dtype={"text": str}, na_filter=False),
    ".jsonl": lambda path: pd.read_json(path, lines=True, dtype=False),  # no guessing: "123" stays text
    ".parquet": pd.read_parquet,
    ".pkl": read_pickle,
}


def columns_of(table, source):
    """The `text` column (and `label`, or None) of a Dataset, DataFrame, list of row dicts or dict of columns."""
    if isinstance(table, (list, dict)):
        table = pd.DataFrame(table)
    names = list(getattr(table, "column_names", None) or getattr(table, "columns", []))
    if "text" not in names:
        raise DataError(f"{source}: no `text` column (columns: {', '.join(map(str, names)) or 'none'}); "
                        "rename the column that holds the texts to `text`")
    texts = list(table["text"])
    if not texts:
        raise DataError(f"{source}: no rows; give a file with at least one text")
    for i, text in enumerate(texts):
        if text is None or (isinstance(text, float) and math.isnan(text)):
            raise DataError(f"{source}: row {i} has no text (a missing value); fill it in (an empty string is "
                            "fine) or drop that row")
        if not isinstance(text, str):
            raise DataError(f"{source}: row {i} has text {text!r}, not a string; fix or drop that row")
    return texts, (list(table["label"]) if "label" in names else None)


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


def check_labels(labels, num_labels, source):
    """Every label must be an integer in 0..num_labels-1."""
    for i, label in enumerate(labels):
        if isinstance(label, bool) or not isinstance(label, numbers.Integral) or not 0 <= label < num_labels:
            raise DataError(f"{source}: row {i} has label {label!r}, outside 0..{num_labels - 1}; "
                            "fix that row or set --num-labels")


def read_texts(source):
    """Texts (and labels, if the file has them, else None) to predict, in input order."""
    return columns_of(read_table(source), source)


def tokenize(tokenizer, texts, max_length):
    """Token ids of every text, truncated to max_length and not padded."""
    return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]


def length_grouped_batches(lengths, batch_size, seed, group_batches=64):
    """One epoch of training batches (lists of row indices) that hold texts of similar length.

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


def sorted_batches(lengths, batch_size):
    """Batches of row indices sorted longest first: least padding, and any memory error comes first."""
    rows = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]


def pad_batch(sequences, pad_id):
    """(input_ids, attention_mask), both (batch, longest) int64 tensors, padded on the right."""
    longest = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, :len(seq)] = torch.tensor(seq)
        attention_mask[row, :len(seq)] = 1
    return input_ids, attention_mask

