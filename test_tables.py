"""tables.read_table: every format read right, and every malformed file refused in one line.

    python -m pytest -q test_tables.py

MALFORMED lists one case per kind of malformed file: (case id, make(tmp_path) -> path, a phrase
the refusal must contain). Each hostile file is built in tmp_path by its case.
"""
import io
import json
import os
import pickle
import struct
import time

import pytest

import tables

TEXTS, LABELS = ["first text", "zweiter Text, ü", "", "k1_0 w3"], [2, 0, 3, 1]


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


def parquet_claiming_rows(tmp_path, claimed=10**9, in_row_group=10**9):
    """9 MB of incompressible texts whose footer claims `claimed` rows, and its one row group
    `in_row_group` (it holds 10,000)."""
    import pyarrow.parquet as pq
    rows = 10_000
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
    """20,000 copies of one 2,000-character text: a few KB on disk, 40 MB once read."""
    return parquet_of(tmp_path, "repeated.parquet", pyarrow_table({"text": ["x" * 2000] * 20_000}))


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
    for file_name, data in content.items():
        if data is not None:
            write(path, file_name, data)
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
     lambda p: parquet_claiming_rows(p, in_row_group=10_001), "its row groups 10,001"),
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
    ("folder_truncated_arrow", truncated_arrow, "its data.arrow is not a readable Arrow stream"),
    ("folder_state_json_not_json", lambda p: folder(p, files={"state.json": "{"}),
     "its state.json is not JSON"),
    ("folder_state_json_not_an_object", lambda p: folder(p, files={"state.json": "[]"}),
     "its state.json is not a JSON object"),
    ("folder_without_dataset_files", lambda p: directory(p, "empty"),
     "it has no state.json or dataset_dict.json"),
    ("folder_dataset_dict_without_train", lambda p: dataset_dict(p, ["test", "validation"]),
     "it is a DatasetDict without a `train` split (splits: test, validation)"),
    ("folder_dataset_dict_split_above_the_folder", lambda p: dataset_dict(p, ["train", "../x"]),
     "not plain folder names"),
    ("folder_schema_names_label_twice", duplicate_arrow, "it names its `label` column twice"),
    # any file
    ("unknown_extension", file("test.txt", "text\na\n"), "unknown kind of input; use .csv"),
    ("no_such_file", lambda p: str(p / "missing"), "no such file or folder"),
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
    assert (texts, labels, warnings) == (["a", None, None, "\ud800 lone"], ["World", 2, None, 2], [])
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
