"""Reading a table from elsewhere as data, never as code: a path in; texts, labels, warnings out.

    texts, labels, warnings = tables.read_table("test.csv")

The contract. `read_table(path, columns=("text", "label"))` reads a `.csv`, `.jsonl`, `.parquet`
or `.pkl` file (a pickle may be gzip-, bz2-, xz- or zip-compressed, told by its first bytes), or a
`datasets.save_to_disk` folder (a Dataset, or a DatasetDict's `train` split). The name's extension
chooses the reader; a name without one of these extensions must be a folder. It returns
- texts: one per row, in the file's order; a str, or None where a text is missing (null, NaN);
- labels: the label column's values as found (an int, a str such as "World", None where one is
  missing; 2.0 is 2), or None when there is no label column;
- warnings: one-line notes (a compressed pickle, a pickled DatasetDict's only split).
Anything else raises `NotReadable` with one line of at most about 300 characters, control
characters escaped: what is wrong (naming the line or row), then what to do.

Rows are what a person sees:
- CSV, read by the csv module: the first line names the columns and every later line is one row;
  in a one-column file an empty line is an empty text. Texts stay as written ("NA", "123"); a
  label is an int when it is written as an integer, else the str, None when empty. A row with
  more or fewer fields than the header is refused, naming its line: the header names the columns,
  so a trailing comma on the rows alone is an extra field, as is an unquoted comma in the text of
  a one-column file (a trailing comma on the header too adds an unnamed column, ignored); an
  empty line in a file of several columns has too few. Bytes that are not UTF-8 become U+FFFD.
- JSON lines: one object per line (blank lines skipped); only the two keys are kept of each.
- Parquet: the footer's row count and sizes are checked against the file's size before reading.
- A save_to_disk folder: only plain-named regular files inside it are read, by pyarrow.ipc.
- Every format: a `text` or `label` column named twice, and a text that is not a string, are
  refused. Only regular files are read, and never more bytes than their size says (at most
  LIMITS["max_bytes"], 2 GiB).

Contained. Each file is read in a child process (`python -I tables.py LIMITS PATH`; pickles, CSV
and JSON lines with `-S` too, the standard library only) under a memory and a CPU-time limit
scaled to the bytes it reads, and a wall clock. Every row and character read is charged to a
`Budget` sized by the file (a row a byte and 16 characters a byte; in parquet, whose encodings
store a repeated value in under a byte, 16 rows a byte and at least 4 Mi), so no file yields
more than its size can honestly hold. The child answers with a JSON line and the texts' UTF-8;
if it is killed, that too is one line.

A pickle is a little program for a stack machine: opcodes push strings, numbers, lists and dicts,
GLOBAL names any importable function ("os.system", "builtins.eval") and REDUCE calls it. The usual
pickle.load runs that program, so a downloaded test.pkl can run anything. An allow-list of "safe"
classes does not help either: the constructors of numpy, pandas, pyarrow and datasets trust their
arguments (some open files, some replay method calls by name). So a pickle is read in three
layers, each of which would stop what the others miss:

1. **Nothing is called.** Every name the pickle asks for becomes an inert record (`Called`) of the
   call it wanted: the name, the arguments, the state BUILD gives it. Python's own Unpickler then
   builds a tree of plain values and records and runs no library code. A name from outside the
   modules that build data (numpy, pandas, pyarrow, datasets, ...) is refused: no data file names
   `builtins.eval`. `table_columns` then reads the few shapes a table takes (a Dataset, a DataFrame,
   a Series, a list of rows, a dict of columns), checking every length, offset and shape against
   its buffer before a byte is read, and returns plain lists.
2. **Nothing grows without bound.** Before any value is built, `scan` walks the opcodes: memo
   slots within the file's size, no data from outside the file, dict and set keys only of types
   whose hashing an attacker cannot steer (str, bytes, int). After loading, `check_nesting` refuses
   values nested over 200 deep or holding themselves. The Budget does the rest.
3. **Contained**, as every format is: a compressed pickle's limits scale with the bytes it
   decompresses to.
"""
import contextlib
import io
import json
import os
import pickle
import pickletools
import stat
import subprocess
import sys

# What the child may spend: CPU seconds and bytes of memory, each a fixed part plus a part per
# byte read (after decompression); the wall clock allows twice the CPU time, plus a margin. A
# file is read whole, so one over max_bytes is refused before it is opened for reading (a sparse
# file, or a /proc file, may say it holds a terabyte).
LIMITS = {"cpu_s": 10.0, "cpu_s_per_mb": 2.0, "memory": 2**30, "memory_per_byte": 64,
          "wall_margin_s": 10.0, "max_bytes": 2**31}
EXPANSION = 16  # a compressed file may expand to this many times its size (at least 4 MiB)
REPLY_PER_BYTE = 16  # characters of text sent back per byte read: the Budget's limit
KINDS = {".csv": "csv", ".jsonl": "jsonl", ".parquet": "parquet", ".pkl": "pickle"}
NEEDS_PYARROW = ("parquet", "folder")  # their children need site-packages: no -S
NAMES = {"csv": "CSV file", "jsonl": "JSON lines file", "parquet": "parquet file",
         "folder": "datasets.save_to_disk folder", "pickle": "table pickle"}
FIX = ("re-save it with ds.to_parquet('test.parquet') or df.to_csv('test.csv', index=False), or "
       "pickle a plain Dataset or DataFrame")
FIXES = {"csv": "check the file, or re-save it with df.to_csv('test.csv', index=False)",
         "jsonl": "write one JSON object per line: df.to_json(path, orient='records', lines=True)",
         "parquet": "check the download, or re-save it with df.to_parquet('test.parquet')",
         "folder": "re-save it with ds.save_to_disk(FOLDER), or ds.to_parquet('test.parquet')",
         "pickle": FIX}


class NotReadable(ValueError):
    """The file is not a table we read; the message is one line: what is wrong, and what to do."""


def read_table(path, columns=("text", "label"), limits=LIMITS):
    """(texts, labels or None, warnings) of the table at `path`, as the module's docstring says."""
    return read_in_child(path, kind_of(path), columns, limits)


def read_pickle(path, limits=LIMITS, columns=("text", "label")):
    """read_table for a pickle, whatever its name."""
    return read_in_child(path, "pickle", columns, limits)


def kind_of(path):
    """The reader for `path`: its extension's (test.pkl.gz is a pickle), else "folder"."""
    stem, ext = os.path.splitext(os.fspath(path).lower())
    if ext in (".gz", ".bz2", ".xz", ".zip", ".zst", ".tar") and stem.endswith(".pkl"):
        ext = ".pkl"
    if ext in KINDS:
        return KINDS[ext]
    if os.path.isdir(path):
        return "folder"
    if not os.path.lexists(path):
        raise not_readable(path, "no such file or folder", "check the path")
    raise not_readable(path, "unknown kind of input", "use .csv, .jsonl, .parquet, .pkl (also "
                       ".pkl.gz, .bz2, .xz, .zip) or a datasets.save_to_disk folder")


def read_in_child(path, kind, columns, limits):
    """What the child `python tables.py LIMITS PATH` answers, or NotReadable: one line."""
    try:
        most = bytes_to_read(path, kind, limits)
    except Refused as e:
        raise not_readable(path, str(e), e.fix) from None
    wall_s = 2 * cpu_seconds(most, limits) + limits["wall_margin_s"]
    isolation = ["-I"] if kind in NEEDS_PYARROW else ["-I", "-S"]
    child_limits = json.dumps({**limits, "kind": kind, "columns": list(columns)})
    command = [sys.executable, *isolation, os.path.abspath(__file__), child_limits,
               os.path.abspath(path)]
    # pyarrow's allocator: malloc, which fails as the memory limit says (mimalloc, its default,
    # reserves 1 GiB of address space at once)
    env = {**os.environ, "ARROW_DEFAULT_MEMORY_POOL": "system"}
    try:
        child = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, env=env,
                               timeout=wall_s)
    except subprocess.TimeoutExpired:
        raise not_readable(path, f"not read: reading it took over {wall_s:.0f} s, the time allowed "
                           "for a file of its size", FIXES[kind]) from None
    if child.returncode != 0:
        why = why_the_child_stopped(child.returncode)
        raise not_readable(path, f"not read: {why}", FIXES[kind])
    try:
        reply, texts = read_reply(child.stdout)
    except ValueError:
        raise not_readable(path, "not read: the reader gave no answer", FIXES[kind]) from None
    if "error" in reply:
        raise not_readable(path, f"not read: {reply['error']}", reply["fix"])
    return texts, reply["labels"], reply["warnings"]


def not_readable(path, what, fix):
    """The one line: the path (at most 100 characters), what is wrong, what to do."""
    shown = one_line(os.fspath(path))
    if len(shown) > 100:
        shown = shown[:48] + "..." + shown[-49:]
    message = one_line(f"{shown}: {what}; {fix}")
    return NotReadable(message if len(message) <= 300 else message[:297] + "...")


def one_line(text):
    """`text` with each character that is not printable (a newline, an escape) shown escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text)[:2000])


def bytes_to_read(path, kind, limits):
    """What the wall clock scales with: a file's size (16 times it, when it may be compressed),
    or the sizes of the regular files in a folder and its subfolders."""
    if kind == "folder":
        return not_too_large(folder_bytes(path), limits)
    with open_regular(path) as f:
        size, head = not_too_large(os.fstat(f.fileno()).st_size, limits), f.read(8)
    compressed = kind == "parquet" or (kind == "pickle" and compression_of(head))
    return decompressed_cap(size) if compressed else size


def not_too_large(size, limits):
    most = limits.get("max_bytes", LIMITS["max_bytes"])
    if size > most:
        raise Refused(f"it says it holds {size:,} bytes, over the {most:,} read here",
                      fix="split it, or raise tables.LIMITS['max_bytes']")
    return size


def folder_bytes(folder, depth=1):
    """The sizes of the regular files in `folder` and, `depth` levels down, its subfolders."""
    total = 0
    try:
        with os.scandir(folder) as entries:
            for entry in entries:  # (links are not followed: the child refuses them)
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
                elif depth and entry.is_dir(follow_symlinks=False):
                    total += folder_bytes(entry.path, depth - 1)
    except OSError as e:
        raise Refused(f"cannot list it ({e.strerror})", fix="check the path") from None
    return total


def read_reply(stdout):
    """(reply, texts) from what write_reply wrote: a JSON line, then every text's UTF-8."""
    end = stdout.index(b"\n")
    reply, blob, texts, start = json.loads(stdout[:end]), memoryview(stdout)[end + 1:], [], 0
    if sum(n for n in reply.get("lengths", []) if n > 0) != len(blob):
        raise ValueError("the texts' lengths do not add up")
    for n in reply.get("lengths", []):  # bytes of UTF-8; -1: a missing text
        texts.append(None if n < 0 else str(blob[start:start + n], "utf-8", "surrogatepass"))
        start += max(n, 0)
    return reply, texts


def why_the_child_stopped(code):
    import signal
    reasons = {getattr(signal, "SIGXCPU", None): "it used more CPU time than a file of its size "
               "may take",
               signal.SIGKILL: "the reader was killed (out of memory, or from outside)",
               signal.SIGSEGV: "the reader crashed (stack overflow?)",
               signal.SIGABRT: "the reader aborted"}
    return reasons.get(-code, f"the reader stopped with exit code {code}")


def cpu_seconds(size, limits):
    return limits["cpu_s"] + limits["cpu_s_per_mb"] * size / 2**20


def open_regular(path, follow=True):
    """The file at `path`, opened for reading only if it is a regular file (never waiting on a
    pipe); with follow=False, not through a symbolic link either."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags if follow else flags | getattr(os, "O_NOFOLLOW", 0))
    except (OSError, ValueError) as e:  # (ValueError: a NUL in the path)
        if not follow and os.path.islink(path):
            raise Refused("it is a symbolic link", fix="keep only the folder's own files") from None
        why = getattr(e, "strerror", None) or short(e)
        raise Refused(f"cannot open it ({why})", fix="check the path") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise Refused("it is not a regular file (a folder, pipe or device)",
                      fix="give the data file itself")
    return os.fdopen(fd, "rb")


# --- the child: python tables.py LIMITS PATH -> one JSON line, then the texts' UTF-8 ------------

def child_main(limits_json, path):
    limits = json.loads(limits_json)
    kind, columns, texts = limits["kind"], tuple(limits["columns"]), []
    try:
        texts, labels, warnings = READERS[kind](path, limits, columns)
        reply = {"labels": labels, "warnings": warnings}
    except Refused as e:
        reply = {"error": str(e), "fix": e.fix or FIXES[kind]}
    except MemoryError:
        reply = {"error": "it needs more memory than a file of its size may take",
                 "fix": FIXES[kind]}
    except RecursionError:
        reply = {"error": "it nests values too deeply", "fix": FIXES[kind]}
    except Exception as e:  # truncated, garbled or inconsistent: all refused the same way
        reply = {"error": f"not a readable {NAMES[kind]} ({type(e).__name__}: {short(e, 100)})",
                 "fix": FIXES[kind]}
    write_reply(reply, texts if "error" not in reply else [])


def write_reply(reply, texts):
    """One JSON line (the labels, warnings or error, and each text's length in bytes: -1 for a
    missing one), then the texts' UTF-8 back to back. A text costs its UTF-8 bytes (a lone
    surrogate its 3), never the six bytes JSON spends on a control character."""
    encoded = [None if t is None else t.encode("utf-8", "surrogatepass") for t in texts]
    reply["lengths"] = [-1 if e is None else len(e) for e in encoded]
    out = sys.stdout.buffer
    out.write(json.dumps(reply).encode("ascii") + b"\n")
    for e in encoded:
        if e:
            out.write(e)
    out.flush()


def limit_resources(size, limits):
    """Address space and CPU time for `size` bytes read (where the OS enforces them; else the
    wall clock)."""
    try:
        import resource
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * resource.getpagesize()
    except (ImportError, OSError):  # Windows, macOS: only the parent's wall clock
        return
    memory = used + limits["memory"] + limits["memory_per_byte"] * size
    for kind, soft in [(resource.RLIMIT_AS, memory),
                       (resource.RLIMIT_CPU, int(cpu_seconds(size, limits)) + 1)]:
        hard = resource.getrlimit(kind)[1]
        soft = soft if hard == resource.RLIM_INFINITY else min(soft, hard)
        try:
            resource.setrlimit(kind, (soft, hard))
        except (ValueError, OSError):
            pass


def read_files(paths, limits, follow=True):
    """Each regular file's bytes, read under limits scaled to their total size, and never more
    bytes than fstat said each holds (a /proc file says 0, a device anything): one that holds
    more is refused."""
    sizes, read = [], []
    for path in paths:
        with named(path, follow), open_regular(path, follow) as f:
            sizes.append(os.fstat(f.fileno()).st_size)
    limit_resources(not_too_large(sum(sizes), limits), limits)
    for path, size in zip(paths, sizes):
        with named(path, follow):
            read.append(read_at_most(path, size, follow))
    return read


@contextlib.contextmanager
def named(path, follow):
    """A folder's own file (follow=False) is named in what is wrong with it."""
    try:
        yield
    except Refused as e:
        if follow:
            raise
        raise Refused(f"its {printable(os.path.basename(path))}: {e}", e.fix) from None


def read_at_most(path, size, follow):
    raw = bytearray()
    with open_regular(path, follow) as f:  # opened again: it may have changed since
        while len(raw) <= size:
            piece = f.read(min(2**20, size + 1 - len(raw)))
            if not piece:
                break
            raw += piece
    if len(raw) > size:
        raise Refused(f"it holds more bytes than the {size:,} its size says (a /proc file?)",
                      fix="give a regular data file")
    return bytes(raw)


def checked(texts, labels, budget, warnings=()):
    """The columns every reader returns, checked once more: one label per text; each text a str
    or None; each label an int, str, float, bool or None (2.0 is 2 and NaN None: pandas stores an
    int column with a gap as floats); no more text than the file's size can honestly hold."""
    text, label = budget.wanted
    if labels is not None and len(labels) != len(texts):
        raise Refused(f"its `{text}` column has {len(texts)} rows but `{label}` has {len(labels)}")
    for row, value in enumerate(texts):
        if value is not None and type(value) is not str:
            raise Refused(f"row {row} has text {short(value)}, not a string",
                          fix="fix or drop that row")
    if labels is not None:
        labels = [int(y) if type(y) is float and y.is_integer() else None if y != y else y
                  for y in labels]
        for row, value in enumerate(labels):
            if value is not None and type(value) not in (int, str, float, bool):
                raise Refused(f"row {row} has label {short(value)}, not a number or a string",
                              fix="fix or drop that row")
    sent = sum(len(t) for t in texts if t) + len(json.dumps(labels))
    if sent > REPLY_PER_BYTE * budget.size + 2**20:
        raise Refused("it decodes to more text than its size can honestly hold")
    return texts, labels, list(warnings)


def column_positions(names, budget):
    """{wanted name: its position} among a header's or schema's `names`; refused: a wanted name
    given twice, or no text column."""
    for name in budget.wanted:
        if names.count(name) > 1:
            raise Refused(f"it names its `{name}` column twice", fix="rename or drop one of them")
    if budget.wanted[0] not in names:
        raise no_text_column(names, budget.wanted[0])
    return {name: names.index(name) for name in budget.wanted if name in names}


def no_text_column(names, text):
    listed = ", ".join(printable(n) for n in list(names)[:20])
    return Refused(f"it has no `{text}` column (columns: {listed or 'none'})",
                   fix=f"rename the column that holds the texts to `{text}`")


class Refused(Exception):
    """The file is not a table we read: `str(e)` says what it holds, `fix` what to do instead
    (None: the usual fix for its kind)."""

    def __init__(self, message, fix=None):
        super().__init__(message)
        self.fix = fix


def printable(name, width=40):
    """A name as it is when it is short and printable, else as a short repr."""
    plain = type(name) is str and name.isprintable() and len(name) <= width
    return name if plain else short(name, width)


def short(value, width=60):
    """A repr safe to print on one line, of bounded cost: a few levels and items deep, at most
    `width` long."""
    import reprlib
    bounded = reprlib.Repr()  # (Python 3.12 takes these as arguments)
    bounded.maxlevel = 3
    bounded.maxtuple = bounded.maxlist = bounded.maxdict = bounded.maxset = 4
    bounded.maxstring = bounded.maxother = bounded.maxlong = width
    try:
        is_error = isinstance(value, BaseException)
        text = str(value)[:4 * width] if is_error else bounded.repr(value)
    except Exception:  # a 5,000-digit int: say what it is, not its value
        text = f"<a {type(value).__name__}>"
    text = one_line(text)
    return text if len(text) <= width else text[:width] + "..."


# --- CSV and JSON lines: the standard library, no guessing ----------------------------------------

def read_csv(path, limits, columns):
    raw = read_files([path], limits)[0]
    return csv_columns(raw, Budget(len(raw), columns))


def csv_columns(raw, budget):
    """The wanted columns of a CSV file's bytes: every line after the header is one row."""
    import csv
    import re
    text, label = budget.wanted
    decoded = raw.decode("utf-8-sig", "replace")  # not UTF-8: U+FFFD, as pandas reads it
    csv.field_size_limit(len(decoded) + 1)  # (the default, 128 KiB, would refuse a long text)
    reader = csv.reader(io.StringIO(decoded, newline=""), strict=True)
    integer = re.compile(r"\s*[+-]?[0-9]{1,4300}\s*", re.ASCII)  # (int() takes 4300 digits)
    line = 1
    try:
        header = next(reader, None)
        if not header:
            raise Refused("it is empty" if header is None else "its first line is empty",
                          fix="start it with a header line: text,label")
        at, width = column_positions(header, budget), len(header)
        texts, labels = [], [] if label in at else None
        line = reader.line_num + 1
        for fields in reader:
            if not fields and width == 1:  # an empty line of a one-column file: an empty text
                fields = [""]
            if len(fields) > width:
                raise Refused(f"line {line} has {len(fields)} fields, more than the header's "
                              f"{width}", fix='quote a text that holds commas ("a, b"), and drop '
                              "any trailing comma")
            if len(fields) < width:
                raise Refused(f"line {line} has {len(fields)} fields, fewer than the header's "
                              f"{width}", fix="give every row all the header's fields")
            budget.take(1, len(fields[at[text]]))
            texts.append(fields[at[text]])
            if labels is not None:
                value = fields[at[label]]
                budget.take(text=len(value))
                labels.append(int(value) if integer.fullmatch(value) else value or None)
            line = reader.line_num + 1
    except csv.Error as e:
        raise Refused(f"line {line} is not CSV ({short(e)})", fix="check its quotes") from None
    return checked(texts, labels, budget)


def read_jsonl(path, limits, columns):
    raw = read_files([path], limits)[0]
    return jsonl_columns(raw, Budget(len(raw), columns))


def jsonl_columns(raw, budget):
    """The wanted keys of each line's JSON object, in order (None where a line lacks one).

    Each object keeps only the wanted keys as it is parsed, so a file whose every line has new
    keys costs its size, not rows times keys. Bytes that are not UTF-8 become lone surrogates
    (made U+FFFD later, with a warning), as a \\ud800 escape does.
    """
    import functools
    text, label = budget.wanted
    texts, labels, found = [], [], set()
    keep_wanted = functools.partial(wanted_keys, budget=budget)
    for number, line in enumerate(raw.decode("utf-8", "surrogateescape").split("\n"), 1):
        if not line.strip(" \t\r"):  # JSON's own whitespace: "\x1c" is no blank line
            continue
        try:
            row = json.loads(line, object_pairs_hook=keep_wanted, parse_int=bounded_int)
        except RecursionError:
            raise Refused(f"line {number} nests values too deeply") from None
        except Refused as e:
            raise Refused(f"line {number} {e}", e.fix) from None
        except ValueError as e:
            raise Refused(f"line {number} is not JSON ({short(e)})") from None
        if not isinstance(row, dict):
            raise Refused(f"line {number} is not a JSON object", fix="give one {...} per line")
        if row.twice:  # the line's own object; one nested in it may repeat its keys
            raise Refused(f"line {number} names `{row.twice}` twice in one object",
                          fix="keep one of them")
        budget.take(1)
        found.update(row)
        texts.append(row.get(text))
        labels.append(row.get(label))
    if text not in found:
        raise Refused(f"no line has a `{text}` key" if texts else "it has no lines",
                      fix=f"give each line a `{text}`: {{\"{text}\": \"...\"}}")
    budget.take_texts(texts)
    budget.take_texts(labels)
    return checked(texts, labels if label in found else None, budget)


class Kept(dict):
    """An object's wanted keys, and the one it named twice (json would keep the last), if any."""
    twice = None


def wanted_keys(pairs, budget):
    """An object of only the wanted keys, noting one named twice."""
    kept = Kept()
    for key, value in pairs:
        if key in budget.wanted:
            if key in kept:
                kept.twice = key
            kept[key] = value
    return kept


def bounded_int(digits):
    if len(digits.lstrip("-")) > 4300:
        raise Refused("has a number of over 4,300 digits, past Python's limit for an int")
    return int(digits)


# --- parquet and save_to_disk folders: pyarrow, after checking what the file says of itself ----

def read_parquet(path, limits, columns):
    """A parquet file's wanted columns. Its footer says how many rows it holds and how large its
    columns are once uncompressed: both are checked against the file's size before a page is read,
    and the limits then scale with the larger of the two."""
    import pyarrow as pa  # imported before the limits are set: they count from here
    import pyarrow.parquet as pq
    raw = read_files([path], limits)[0]
    # text is charged to the file's bytes; rows to 16 times them: dictionary and run-length
    # encoding store a column of few distinct values in well under a byte a row
    budget = Budget(len(raw), columns, rows=decompressed_cap(len(raw)))
    source = pq.ParquetFile(pa.BufferReader(raw), thrift_string_size_limit=len(raw) + 1,
                            thrift_container_size_limit=len(raw) // 8 + 1000)
    at = column_positions(source.schema_arrow.names, budget)
    meta = source.metadata
    groups = [meta.row_group(g) for g in range(meta.num_row_groups)]
    rows = meta.num_rows
    if rows != sum(g.num_rows for g in groups):
        raise Refused(f"its footer claims {rows:,} rows, its row groups "
                      f"{sum(g.num_rows for g in groups):,}")
    if not 0 <= rows <= budget.rows:
        raise Refused(f"its footer claims {rows:,} rows, more than a file of {len(raw):,} bytes "
                      "holds")
    budget.take(rows)
    leaves = [j for j in range(meta.num_columns)
              if meta.schema.column(j).path.split(".")[0] in at]  # a nested column has several
    sizes = [g.column(j).total_uncompressed_size for g in groups for j in leaves]
    if min(sizes, default=0) < 0 or sum(sizes) > decompressed_cap(len(raw)):
        raise Refused(f"its footer says its columns take {sum(sizes):,} bytes uncompressed, over "
                      f"{EXPANSION} times its size")
    limit_resources(max(len(raw), sum(sizes)), limits)
    table = source.read(columns=list(at), use_threads=False)
    table.validate(full=True)
    return arrow_columns([table], at, budget)


def arrow_columns(tables, at, budget):
    """The wanted columns of pyarrow tables or record batches, one after another."""
    text, label = budget.wanted
    texts, labels = [], [] if label in at else None
    for table in tables:
        texts += budget.take_texts(table.column(text).to_pylist())
        if labels is not None:
            labels += budget.take_texts(table.column(label).to_pylist())
    return checked(texts, labels, budget)


def read_folder(folder, limits, columns):
    """A save_to_disk folder: its state.json names its Arrow files, each read with pyarrow.ipc
    (datasets would follow any path the folder names); a DatasetDict's `train` split."""
    if os.path.lexists(os.path.join(folder, "dataset_dict.json")):
        splits = json_file(os.path.join(folder, "dataset_dict.json"), limits).get("splits")
        if type(splits) is not list or not all(plain_name(s) for s in splits):
            raise Refused(f"its dataset_dict.json lists splits {short(splits)}, not plain folder "
                          "names")
        if "train" not in splits:
            raise Refused(f"it is a DatasetDict without a `train` split (splits: "
                          f"{', '.join(printable(s, 20) for s in splits[:8]) or 'none'})",
                          fix="give the folder of the split you mean, such as FOLDER/test")
        folder = os.path.join(folder, "train")
        if os.path.islink(folder) or not os.path.isdir(folder):
            raise Refused("its `train` split is not a folder inside it")
    if not os.path.lexists(os.path.join(folder, "state.json")):
        raise Refused("it has no state.json or dataset_dict.json", fix="give a folder that "
                      "ds.save_to_disk wrote, or a .csv, .jsonl, .parquet or .pkl file")
    state = json_file(os.path.join(folder, "state.json"), limits)
    files = state.get("_data_files")
    files = files if type(files) is list else []
    names = [f.get("filename") if type(f) is dict else None for f in files]
    if not names or not all(plain_name(n) for n in names) or len(set(names)) < len(names):
        raise Refused(f"its state.json names data files {short(names)}, not plain names of "
                      "its own files")
    import pyarrow as pa  # imported before the data's limits are set: they count from here
    import pyarrow.ipc  # noqa: F401
    raws = read_files([os.path.join(folder, n) for n in names], limits, follow=False)
    budget, batches, at = Budget(sum(map(len, raws)), columns), [], None
    for name, raw in zip(names, raws):
        try:
            stream = pa.ipc.open_stream(pa.BufferReader(raw))
            names_here = column_positions(stream.schema.names, budget)
            if at is not None and names_here != at:
                raise Refused(f"its data files hold different columns ({printable(name)})")
            at = names_here
            for batch in stream:
                budget.take(STRUCTURE + batch.num_rows)
                batch.validate(full=True)
                batches.append(batch)
        except (pa.ArrowException, OSError) as e:  # (pyarrow's "could not read" is an OSError)
            if isinstance(e, MemoryError):
                raise
            raise Refused(f"its {printable(name)} is not a readable Arrow stream "
                          f"({type(e).__name__}: {short(e, 80)})") from None
    return arrow_columns(batches, at, budget)


def json_file(path, limits):
    """A small JSON object from a folder's own file (state.json, dataset_dict.json)."""
    raw = read_files([path], limits, follow=False)[0]
    if len(raw) > 2**24:
        raise Refused(f"its {os.path.basename(path)} is over 16 MiB")
    try:
        value = json.loads(raw)
    except ValueError as e:
        raise Refused(f"its {os.path.basename(path)} is not JSON ({short(e)})") from None
    if type(value) is not dict:
        raise Refused(f"its {os.path.basename(path)} is not a JSON object")
    return value


def plain_name(name):
    """A file's or folder's own name: no path, nothing above (no /, \\, .., absolute path)."""
    return type(name) is str and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


# --- pickles: read as data, in the three layers below ------------------------------------------

def read_pickled(path, limits, columns):
    raw, compressed = decompress(read_files([path], limits)[0])
    limit_resources(len(raw), limits)  # now scaled to the bytes really read
    return read_here(raw, compressed, columns)


def read_here(raw, compressed=None, columns=("text", "label")):
    """(texts, labels or None, warnings) of a pickle's bytes, in this process (the child's work)."""
    refuse_other_formats(raw)
    scan(raw)
    unpickler = RecordingUnpickler(io.BytesIO(raw))
    tree = unpickler.load()
    unpickler.refuse_foreign_names()
    check_nesting(tree)
    warnings = [f"it is {compressed}-compressed: read decompressed"] if compressed else []
    budget = Budget(len(raw), columns)
    read = table_columns(tree, budget, warnings)
    texts = [None if type(t) is float and t != t else t for t in read[columns[0]]]  # NaN: missing
    return checked(texts, read.get(columns[1]), budget, warnings)


# --- compression: recognised by the first bytes, whatever the file's name -------------------------

MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz", b"PK\x03\x04": "zip",
         b"(\xb5/\xfd": "zstd"}


def compression_of(head):
    return next((kind for magic, kind in MAGIC.items() if head.startswith(magic)), None)


def decompressed_cap(size):
    """The most bytes a compressed file of `size` bytes may expand to: 16 times, and at least
    4 MiB. Texts compress 2-4 times; the limits scale with the bytes decompressed, so a larger
    ratio would let a small file buy a large allowance."""
    return max(4 * 2**20, EXPANSION * size)


def decompress(raw):
    """(bytes, the compression's name or None): gzip, bz2, xz or a one-member zip, under a cap."""
    kind = compression_of(raw[:8])
    if kind is None:
        return raw, None
    if kind == "zstd":
        raise Refused("it is zstd-compressed, which is not read here",
                      fix="decompress it first (zstd -d FILE -o test.pkl) and pass the result")
    import bz2
    import gzip
    import lzma
    import zipfile
    try:
        if kind == "zip":
            archive = zipfile.ZipFile(io.BytesIO(raw))
            # (not macOS's resource forks)
            members = [m for m in archive.namelist() if not m.startswith("__MACOSX/")]
            if len(members) != 1:
                raise Refused(f"it is a zip archive of {len(members)} files, not of one pickle",
                              fix="unzip it and pass the .pkl inside")
            stream = archive.open(members[0])
        else:
            opener = {"gzip": lambda f: gzip.GzipFile(fileobj=f), "bz2": bz2.BZ2File,
                      "xz": lzma.LZMAFile}[kind]
            stream = opener(io.BytesIO(raw))
        cap = decompressed_cap(len(raw))
        data = stream.read(cap + 1)
    except (OSError, EOFError, ValueError, RuntimeError, NotImplementedError, zipfile.BadZipFile,
            lzma.LZMAError) as e:
        raise Refused(f"it looks {kind}-compressed but does not decompress ({short(e, 80)})",
                      fix="check the download, or re-save it uncompressed") from None
    if len(data) > cap:
        raise Refused(f"it is {kind}-compressed and expands to over {cap:,} bytes ({EXPANSION} "
                      "times its size, or 4 MiB)", fix="decompress it yourself and pass the .pkl")
    return data, kind


def is_tar(raw):
    """A tar archive's first header: "ustar" at 257, and its checksum (the header's bytes, the
    field as spaces)."""
    if len(raw) < 512 or raw[257:262] != b"ustar":
        return False
    try:
        checksum = int(raw[148:156].strip(b" \0") or b"-1", 8)
        return checksum == sum(raw[:148]) + 8 * 32 + sum(raw[156:512])
    except ValueError:
        return False


def refuse_other_formats(raw):
    if is_tar(raw):
        raise Refused("it is a tar archive, not a pickle",
                      fix="extract it (tar xf FILE) and pass the .pkl inside")
    if compression_of(raw[:8]):
        raise Refused("it is compressed twice", fix="decompress it yourself and pass the .pkl")


# --- layer 2, before anything is built: a walk over the opcodes -----------------------------------

# What the scan knows of a stack value: a safe key, or not, or _codecs.encode, whose result is
# bytes (protocols 0-2 write bytes as encode(str, 'latin1'))
MARK, KEY, OTHER, ENCODE = 0, 1, 2, 3
KEY_OPCODES = {"UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "STRING", "BINSTRING",
               "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "INT", "BININT",
               "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "NEWTRUE", "NEWFALSE"}
KEYED = {"DICT": 2, "SETITEMS": 2, "FROZENSET": 1, "ADDITEMS": 1}  # 2: every other item is a key
MEMO_OPCODES = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE", "GET", "BINGET", "LONG_BINGET"}
# the opcodes that push a new value
FRESH = {op.name for op in pickletools.opcodes if op.stack_after} - MEMO_OPCODES - {"DUP"}


def stack_effect(opcode):
    """(values popped below the mark, pops to a mark?, values pushed, key step) of one opcode."""
    before = list(opcode.stack_before)
    marked = pickletools.markobject in before
    below = before[:before.index(pickletools.markobject)] if marked else before
    return len(below), marked, len(opcode.stack_after), KEYED.get(opcode.name, 0)


EFFECTS = {op.name: stack_effect(op) for op in pickletools.opcodes}
BUILDERS = {"EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET", "EMPTY_TUPLE", "LIST", "DICT", "TUPLE",
            "TUPLE1", "TUPLE2", "TUPLE3", "FROZENSET", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "OBJ",
            "INST", "BUILD"}  # containers, records


def scan(raw):
    """Walk the opcodes without building anything, and refuse what would hurt even the recorder.

    - data from outside the file (out-of-band buffers, persistent ids);
    - ints of 2**61 or more (an int hashes to itself mod 2**61 - 1, so such ints collide at will);
    - dict and set keys that are not str, bytes or int: hashing a tuple or a record of the
      attacker's choice could take quadratic time (str and bytes hashes are randomized);
    - memo slots past the file's size, or memo writes that Python's pickler never makes (twice in
      a row, or of a value just read from the memo). The memo is tracked in one byte per slot,
      so the scan's memory is bounded by the file's size;
    - more containers and records than one per 4 bytes: each costs the unpickler 50-250 bytes, so
      a file of one-byte EMPTY_SETs would take 230 times its size (a table needs fewer: one of
      one-row Arrow chunks needs one per 5 to 10 bytes, by pickle protocol).
    """
    stack, marks, built = [], [], 0
    memo = bytearray(len(raw) + 1)  # the kind of each memo slot's value (0: not set)
    memoized = put = 0  # Python writes MEMOIZE (protocol 4+) or PUT (0-3), never both
    previous = None
    for opcode, arg, _ in pickletools.genops(raw):  # checks every length against the bytes left
        name = opcode.name
        if name in ("NEXT_BUFFER", "READONLY_BUFFER", "PERSID", "BINPERSID"):
            raise Refused(f"it needs data from outside the file ({name})")
        if type(arg) is int and not -2**61 < arg < 2**61:
            raise Refused("it holds an integer too large for a table cell")
        if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            slot = memoized if name == "MEMOIZE" else arg
            mixed = put if name == "MEMOIZE" else memoized
            if mixed or previous not in FRESH or not 0 <= slot < len(memo):
                raise Refused(f"its memo is not as a pickler writes it ({name} of slot "
                              f"{short(slot)} after {previous})")
            memo[slot] = stack[-1]
            memoized, put = memoized + (name == "MEMOIZE"), put or name != "MEMOIZE"
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            if not 0 <= arg < len(memo) or not memo[arg]:
                raise Refused(f"it reads memo slot {short(arg)} before setting it")
            stack.append(memo[arg])
        elif name == "MARK":
            marks.append(len(stack))
            stack.append(MARK)
        elif name == "DUP":
            stack.append(stack[-1])
        elif name == "GLOBAL" and arg == "_codecs encode":
            stack.append(ENCODE)
        elif name == "FRAME":  # framing only groups opcodes: it is not one
            continue
        else:
            pop_and_push(name, stack, marks)
            built += name in BUILDERS
            if built > len(raw) // 4 + 1000:
                raise Refused("it builds more values than its size can honestly hold")
        previous = name


BAD_KEY = "it uses a key that is not a string or a number (only str, bytes and int keys are read)"


def pop_and_push(name, stack, marks):
    """The stack effect of one opcode, checking the keys of every dict and set it builds."""
    below, marked, pushed, key_step = EFFECTS[name]
    if marked:  # the values above the last MARK go, and the mark
        floor = marks.pop()
        if key_step and any(kind != KEY for kind in stack[floor + 1::key_step]):
            raise Refused(BAD_KEY)
        del stack[floor:]
    elif name == "SETITEM" and len(stack) >= 2 and stack[-2] != KEY:
        raise Refused(BAD_KEY)
    if len(stack) - (marks[-1] + 1 if marks else 0) < below:
        raise Refused(f"its {name} finds too few values on the stack")
    kind = KEY if name in KEY_OPCODES or (name == "REDUCE" and stack[-2] == ENCODE) else OTHER
    if below:
        del stack[-below:]
    stack += [kind] * pushed


# --- layer 1: loading with inert records --------------------------------------------------------

DATA_MODULES = ("numpy", "pandas", "pyarrow", "datasets", "datetime", "decimal", "collections",
                "copyreg", "_codecs", "zoneinfo", "pytz", "dateutil")
PLAIN_BUILTINS = {"bytearray", "bytes", "set", "frozenset", "list", "dict", "tuple", "slice",
                  "complex", "int", "float", "str", "bool", "object", "range"}


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

    def __setitem__(self, key, value):  # SETITEM(S) on a dict subclass (OrderedDict, DatasetDict)
        self.state = self.state if type(self.state) is dict else {}
        self.state[key] = value


class RecordingUnpickler(pickle.Unpickler):
    """Python's Unpickler, except that every global it asks for is a fresh `Called` subclass."""

    def __init__(self, file):
        super().__init__(file)
        self.names = {}

    def find_class(self, module, name):
        import _compat_pickle  # Python 2 names, as protocols 0-2 write them (__builtin__, copy_reg)
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        key = f"{module}.{name}"
        if key not in self.names:
            if len(self.names) >= 100:  # a Dataset pickle names about 20
                raise Refused("it names over 100 different functions")
            self.names[key] = type("Called", (Called,), {"name": key})
        return self.names[key]

    def refuse_foreign_names(self):
        """Refuse a pickle that names anything but the builders of data (nothing was called
        either way)."""
        if any(key.split(".")[0] == "polars" for key in self.names):
            raise Refused("it is a polars DataFrame, which is not read here",
                          fix="where it was made, write df.write_parquet('test.parquet'), or "
                              "pickle df.to_pandas()")
        foreign = sorted(key for key in self.names if not (key.split(".")[0] in DATA_MODULES or (
            key.startswith("builtins.") and key[9:] in PLAIN_BUILTINS)))
        if foreign:
            listed = ", ".join(printable(k) for k in foreign[:5])
            more = ", ..." if len(foreign) > 5 else ""
            raise Refused(f"it names {listed}{more}, which no data file needs (nothing was run)",
                          fix="do not use this file; get the data as .csv or .parquet from its "
                              "source")


def children(value):
    if type(value) in (list, tuple, set, frozenset):
        return value
    if type(value) is dict:
        return [*value.keys(), *value.values()]
    if isinstance(value, Called):
        return (value.args, value.state)
    return ()


def check_nesting(tree, limit=200):
    """Refuse values nested deeper than `limit` or holding themselves (walked without recursion).

    The reader below recurses into what it reads, so it must know the true depth: a list filled
    after it was memoized can be deeper than it looked when it was made.
    """
    depth, on_path, todo = {}, set(), [(tree, False)]
    while todo:
        value, finished = todo.pop()
        key = id(value)
        if finished:
            on_path.discard(key)
            depth[key] = 1 + max((depth.get(id(c), 0) for c in children(value)), default=0)
            if depth[key] > limit:
                raise Refused(f"it nests values over {limit} deep")
        elif key in on_path:
            raise Refused("it holds a value that contains itself")
        elif key not in depth and children(value):
            on_path.add(key)
            todo.append((value, True))
            todo += [(c, False) for c in children(value) if id(c) not in depth]


# --- layer 1, reading: the shapes a table takes -------------------------------------------------

class Budget:
    """How many rows and text bytes a file of `size` bytes may honestly yield.

    Every row needs at least a byte of the file, and text at most 16 characters per byte of the
    file (a text shared through the memo counts at each use: pd.concat([df] * 10) is honest, a
    text named a million times is not). Every read is charged as it happens, in Python ints (no
    wrap-around, no negative charges). Each structure read (an array, a block, a table) costs rows
    too, so one shared by reference cannot be read more often than the file has bytes for.
    """

    def __init__(self, size, wanted=("text", "label"), rows=None):
        self.size, self.rows = size, size if rows is None else rows
        self.text = REPLY_PER_BYTE * size + 2**20
        self.wanted = wanted  # the two columns read (texts, labels); every other is skipped unread

    def take(self, rows=0, text=0):
        if type(rows) is not int or type(text) is not int or rows < 0 or text < 0:
            raise Refused("it has a negative or non-integer size")
        self.rows, self.text = self.rows - rows, self.text - text
        if self.rows < 0 or self.text < 0:
            raise Refused("it decodes to more rows or text than its size can honestly hold")

    def take_texts(self, values):
        self.take(text=sum(len(v) for v in values if type(v) is str))
        return values


STRUCTURE = 16  # rows charged for reading an array, a block or a table: each takes more bytes


def call_of(obj):
    """(short name, args, state) of a record; `copyreg._reconstructor(cls, ...)` counts as `cls`."""
    if isinstance(obj, type) and issubclass(obj, Called):  # a class used as a value (pandas.NA)
        return obj.name.rpartition(".")[2], (), None
    if not isinstance(obj, Called):
        return None, (), None
    name, args = obj.name.rpartition(".")[2], obj.args
    if name in ("_reconstructor", "__newobj__", "__newobj_ex__") and args \
            and isinstance(args[0], type) and issubclass(args[0], Called):
        name, args = args[0].name.rpartition(".")[2], args[1:]
    return name, args, obj.state


def table_columns(tree, budget, warnings):
    """{'text': [...], 'label': [...] (if any)} of whichever table shape the pickle holds."""
    name, args, state = call_of(tree)
    if type(tree) in (list, tuple) and tree and all(type(row) is dict for row in tree):  # rows
        budget.take(len(tree))
        keys = dict.fromkeys(k for row in tree for k in row)  # every row's: the first may lack one
        columns = {k: [cell(row.get(k), budget) for row in tree] if k in budget.wanted else None
                   for k in keys}
    elif type(tree) is dict:  # a dict of columns
        columns = {k: values_of(v, budget) if k in budget.wanted else None for k, v in tree.items()}
    elif name == "DatasetDict":  # a dict subclass: its items come by SETITEMS, or as an argument
        splits = state if type(state) is dict else args[-1] if args else None  # (protocols 0-1)
        return one_split(splits, budget, warnings)
    elif name == "Dataset":
        columns = dataset_columns(state, budget)
    elif name == "DataFrame":
        columns = frame_columns(state, budget)
    elif name == "Series" or type(tree) in (list, tuple) or name in ("_reconstruct", "_frombuffer"):
        values = series_values(tree, state, budget) if name == "Series" else values_of(tree, budget)
        columns = {budget.wanted[0]: values}
    else:
        held = tree.name if isinstance(tree, Called) else type(tree).__name__
        raise Refused(f"it holds {short(held)}, not a Dataset, DataFrame, Series, list of rows or "
                      "texts, or dict of columns")
    if budget.wanted[0] not in columns:
        raise no_text_column(columns, budget.wanted[0])
    return {k: v for k, v in columns.items() if k in budget.wanted}


def one_split(splits, budget, warnings):
    """A DatasetDict: its one split, or one line naming them all."""
    names = list(splits) if type(splits) is dict else []
    if len(names) != 1:
        listed = ", ".join(short(n, 20) for n in names[:8])
        raise Refused(f"it is a DatasetDict of {len(names)} splits ({listed})",
                      fix="pickle the split you mean: pickle.dump(dsd['test'], f)")
    warnings.append(f"it is a DatasetDict: read its one split, {short(names[0], 30)}")
    return table_columns(splits[names[0]], budget, [])


def cell(value, budget):
    """A cell as str, int, float, bool or None (missing: None, NaN, pandas.NA or NaT).

    numpy scalars (np.int64(2) in a list of rows) are read as their value; anything else is refused.
    """
    if type(value) is str:
        budget.take(text=len(value))
        return value
    if value is None or type(value) in (int, float, bool):
        return value
    name, args, _ = call_of(value)
    if name in ("NA", "NAType", "__nat_unpickle", "NaTType"):
        return None
    if name == "scalar" and len(args) == 2 and numpy_dtype(args[0]) != "object":
        values = numbers_from(as_bytes(args[1], budget), numpy_dtype(args[0]))
        if len(values) == 1:
            return values[0]
    found = printable(name or type(value).__name__)
    raise Refused(f"a text or label is {found}, not a string or a number")


def values_of(obj, budget):
    """A column as a plain list, from a list, a numpy, Arrow or pandas array, or a Series."""
    if type(obj) in (list, tuple):
        budget.take(len(obj))
        return [cell(v, budget) for v in obj]
    name, args, state = call_of(obj)
    if name in ("_reconstruct", "_frombuffer"):
        shape, rows = numpy_array(name, args, state, budget, keep=None)
        if len(shape) != 1:
            raise Refused(f"a column is a numpy array of shape {short(shape)}, not one value a "
                          "row")
        return rows
    if name in ("_restore_array", "chunked_array"):
        return arrow_values(obj, budget)
    if name == "Series":  # a dict of Series: {"text": df.text, "label": df.label}
        return series_values(obj, state, budget)
    arrow_backed = ("ArrowStringArray", "ArrowStringArrayNumpySemantics", "ArrowExtensionArray")
    if name in arrow_backed and type(state) is dict:  # (pandas 1.5 called it _data)
        return arrow_values(state.get("_pa_array", state.get("_data")), budget)
    if name in ("IntegerArray", "BooleanArray", "FloatingArray") and type(state) is dict:  # a mask
        values = values_of(state.get("_data"), budget)
        missing = values_of(state.get("_mask"), budget)
        if len(values) != len(missing):
            raise Refused("a nullable column's mask does not match its values")
        return [None if m else v for v, m in zip(values, missing)]
    if name == "_new_Index" and len(args) == 2 and type(args[1]) is dict:  # an Index's values
        return values_of(args[1].get("data"), budget)
    if name == "__pyx_unpickle_NDArrayBacked" and args and type(state) is tuple and len(state) >= 2:
        kind = call_of(args[0])[0]
        if kind == "Categorical":
            return categories_of(state[0], state[1], budget)
        if kind == "StringArray":  # (dtype, numpy object array)
            return values_of(state[1], budget)
        name = kind
    found = short(name or type(obj).__name__)
    raise Refused(f"its text or label column is {found}, which is not read here")


def categories_of(dtype, codes, budget):
    """A pandas Categorical: each code is an index into the categories (-1: missing)."""
    _, _, dtype_state = call_of(dtype)
    categories = (dtype_state or {}).get("categories") if type(dtype_state) is dict else None
    categories = values_of(categories, budget)
    codes = values_of(codes, budget)
    if not all(type(c) is int and -1 <= c < len(categories) for c in codes):
        raise Refused("a categorical column has codes outside its categories")
    # each use of a category costs
    return budget.take_texts([None if c < 0 else categories[c] for c in codes])


def series_values(series, state, budget):
    """A pandas Series: SingleBlockManager with state (axes, [values], ...)."""
    manager = state.get("_mgr") if type(state) is dict else None
    _, _, manager_state = call_of(manager)
    if type(manager_state) is not tuple or len(manager_state) < 2 \
            or type(manager_state[1]) is not list or len(manager_state[1]) != 1:
        raise Refused("a Series in a layout this reader does not know")
    return values_of(manager_state[1][0], budget)


def as_bytes(obj, budget):
    """Bytes as a pickle writes them: bytes, bytearray, or (protocol 0-2)
    bytearray(encode(s, 'latin1')).

    Each buffer read costs its size: one buffer named a thousand times is read at most a few
    times.
    """
    name, args, _ = call_of(obj)
    for _ in range(2):  # py_buffer(bytearray(...))
        if name in ("py_buffer", "bytearray", "bytes") and len(args) == 1:
            obj = args[0]
            name, args, _ = call_of(obj)
    if name in ("bytearray", "bytes") and not args:  # protocols 0-2 write b"" as bytes()
        return b""
    latin1 = name == "encode" and len(args) == 2 and args[1] in ("latin1", "latin-1")
    if latin1 and type(args[0]) is str:
        budget.take(text=len(args[0]))
        return args[0].encode("latin-1")
    if type(obj) in (bytes, bytearray):
        budget.take(text=len(obj))
        return bytes(obj)
    raise Refused("a buffer is not plain bytes")


def count(value, what):
    if type(value) is not int or value < 0:
        raise Refused(f"{what} is {short(value)}, not a count")
    return value


# numpy: _reconstruct(ndarray, (0,), b'b') + BUILD (version, shape, dtype, fortran, data), or
# _frombuffer(data, dtype, shape, order). Read: object (a list), bool, int, float and unicode
# arrays.

def numpy_array(name, args, state, budget, keep):
    """(shape, values): 1-D, a list of values; 2-D (a pandas block), {row: values} for the rows
    in `keep`."""
    if name == "_frombuffer" and len(args) == 4:
        data, dtype, shape, order = args
    elif name == "_reconstruct" and type(state) is tuple and len(state) in (4, 5):
        shape, dtype, fortran, data = state[-4:]
        order = "F" if fortran is True else "C"
    else:
        raise Refused("a numpy array is in an unknown layout")
    if type(shape) is not tuple or not 1 <= len(shape) <= 1 + (keep is not None):
        raise Refused(f"a numpy array has shape {short(shape)}")
    shape = tuple(count(n, "a numpy dimension") for n in shape)
    size = shape[0] * (shape[1] if len(shape) == 2 else 1)
    budget.take(size)
    kind = numpy_dtype(dtype)
    if kind == "object":
        if type(data) is not list or len(data) != size:
            raise Refused("a numpy object array's items do not match its shape")
        flat = data
    else:
        flat = numbers_from(as_bytes(data, budget), kind, size)
    if len(shape) == 1:
        return shape, [cell(v, budget) for v in flat] if kind == "object" else flat
    width, length = shape  # a pandas block: one row per column of the frame
    # numpy lists an object array's items in C order, always
    by_columns = order == "F" and kind != "object"
    picked = {r: (flat[r::width] if by_columns else flat[r * length:(r + 1) * length])
              for r in keep}
    return shape, {r: [cell(v, budget) for v in values] if kind == "object" else values
                   for r, values in picked.items()}


def numpy_dtype(obj):
    """The dtype of a pickled dtype record: "object", or (code, itemsize, byte order) of a number
    or text."""
    name, args, state = call_of(obj)
    code = args[0] if name == "dtype" and args and type(args[0]) is str else ""
    ordered = type(state) is tuple and len(state) > 1 and state[1] in ("<", ">", "|", "=")
    order = state[1] if ordered else "|"
    if code in ("O4", "O8"):
        return "object"
    if code[:1] in ("i", "u", "b", "f", "U") and code[1:].isdigit() and code[1:].isascii():
        size = int(code[1:]) * (4 if code[0] == "U" else 1)
        sizes = (1, 2, 4, 8) if code[0] in "iu" else (1,) if code[0] == "b" else (4, 8)
        if code[0] == "U" or size in sizes:
            big = order == ">" or (order == "=" and sys.byteorder == "big")
            return code[0], size, big
    raise Refused(f"a text or label column has dtype {short(code or name)}, which is not read here")


def numbers_from(buffer, kind, size=None):
    """Python values of a numpy buffer of `kind` (see numpy_dtype), checked against `size` items."""
    import array
    letter, width, big = kind
    size = len(buffer) // width if size is None else size
    if width == 0 or len(buffer) != size * width:
        raise Refused(f"a numpy array of {size} items has {len(buffer)} bytes")
    if letter == "U":  # fixed-width UTF-32, padded with NULs
        codec = "utf-32-be" if big else "utf-32-le"
        return [buffer[i:i + width].decode(codec, "surrogatepass").rstrip("\0")
                for i in range(0, len(buffer), width)]
    if letter == "b":
        return [b != 0 for b in buffer]
    typecode = {("i", 1): "b", ("u", 1): "B", ("i", 2): "h", ("u", 2): "H", ("i", 4): "i",
                ("u", 4): "I", ("i", 8): "q", ("u", 8): "Q", ("f", 4): "f",
                ("f", 8): "d"}[letter, width]
    values = array.array(typecode, buffer)
    if big != (sys.byteorder == "big"):
        values.byteswap()
    return values.tolist()


# pyarrow: _restore_array((type, length, null_count, offset, buffers, children, dictionary)),
# chunked_array([arrays], type). Strings: validity bitmap, offsets (int32, or int64 when large),
# bytes.
ARROW_NUMBERS = {"int8": ("i", 1), "int16": ("i", 2), "int32": ("i", 4), "int64": ("i", 8),
                 "uint8": ("u", 1), "uint16": ("u", 2), "uint32": ("u", 4), "uint64": ("u", 8),
                 "float": ("f", 4), "double": ("f", 8)}
ARROW_STRINGS = {"string": 4, "utf8": 4, "large_string": 8, "large_utf8": 8}


def arrow_values(obj, budget):
    name, args, _ = call_of(obj)
    budget.take(STRUCTURE)  # every array read costs: repeating one array cannot multiply work
    if name == "chunked_array" and args and type(args[0]) is list:
        return [v for chunk in args[0] for v in arrow_values(chunk, budget)]
    if name != "_restore_array" or len(args) != 1 or type(args[0]) is not tuple or len(args[0]) < 6:
        raise Refused(f"an Arrow column is {short(name)}, which is not read here")
    arrow_type, length, _, offset, buffers, children_ = args[0][:6]
    type_name, type_args, _ = call_of(arrow_type)
    aliased = type_name == "type_for_alias" and type_args and type(type_args[0]) is str
    alias = type_args[0] if aliased else ""
    length, offset = count(length, "an Arrow length"), count(offset, "an Arrow offset")
    budget.take(length)
    if children_ or type(buffers) is not list or alias not in {**ARROW_NUMBERS, **ARROW_STRINGS,
                                                               "null": 0}:
        found = short(alias or type_name)
        raise Refused(f"an Arrow column has type {found}, which is not read here")
    if alias == "null":
        return [None] * length
    valid = arrow_validity(buffers[0] if buffers else None, offset, length, budget)
    if alias in ARROW_NUMBERS and len(buffers) == 2:
        letter, width = ARROW_NUMBERS[alias]
        data = as_bytes(buffers[1], budget)
        if len(data) < (offset + length) * width:
            raise Refused(f"an Arrow array of {length} numbers has {len(data)} bytes")
        values = numbers_from(data[offset * width:(offset + length) * width],
                              (letter, width, False), length)
    elif alias in ARROW_STRINGS and len(buffers) == 3:
        values = arrow_strings(as_bytes(buffers[1], budget), as_bytes(buffers[2], budget),
                               ARROW_STRINGS[alias], offset, length, budget)
    else:
        raise Refused(f"an Arrow {alias} array has {len(buffers)} buffers")
    return [v if ok else None for v, ok in zip(values, valid)]


def arrow_validity(bitmap, offset, length, budget):
    """Which rows are not null, from Arrow's validity bitmap (least significant bit first; None:
    all are)."""
    if bitmap is None:
        return [True] * length
    bits = as_bytes(bitmap, budget)
    if len(bits) * 8 < offset + length:
        raise Refused("an Arrow validity bitmap is shorter than its array")
    # bit i is character i
    as_text = format(int.from_bytes(bits, "little"), f"0{len(bits) * 8}b")[::-1]
    return [c == "1" for c in as_text[offset:offset + length]]


def arrow_strings(offsets, data, width, offset, length, budget):
    """Each string data[ends[i]:ends[i+1]], after checking, in Python ints, that the ends lie in
    order in data."""
    if len(offsets) < (offset + length + 1) * width:
        raise Refused(f"an Arrow string array of {length} rows has too few offsets")
    ends = numbers_from(offsets[offset * width:(offset + length + 1) * width], ("i", width, False),
                        length + 1)
    if ends[0] < 0 or ends[-1] > len(data) or any(a > b for a, b in zip(ends, ends[1:])):
        raise Refused("an Arrow string array's offsets run outside its data")
    budget.take(text=ends[-1] - ends[0])  # the texts' lengths, charged before they are made
    try:
        return [data[ends[i]:ends[i + 1]].decode("utf-8") for i in range(length)]
    except UnicodeDecodeError:
        raise Refused("an Arrow string array holds bytes that are not UTF-8") from None


def table_of(obj, budget):
    """{name: values} of a datasets table: InMemoryTable, or ConcatenationTable (blocks of
    tables)."""
    name, _, state = call_of(obj)
    if name == "MemoryMappedTable":
        raise Refused("this Dataset was pickled straight from the file it maps (loaded from "
                      "parquet or the hub cache), so it holds a path on the machine that made it, "
                      "not the data",
                      fix="where it was made, write ds.to_parquet('test.parquet'), or pickle an "
                          "in-memory copy: pickle.dump(Dataset.from_dict(ds.to_dict()), f)")
    if name == "InMemoryTable" and type(state) is dict:
        return arrow_table(state.get("table"), budget)
    if name == "ConcatenationTable" and type(state) is dict and type(state.get("blocks")) is list:
        pieces = []  # blocks: rows of tables, each row's tables side by side
        for row in state["blocks"]:
            side_by_side = {}
            for table in row if type(row) is list else ():
                side_by_side.update(table_of(table, budget))
            pieces.append(side_by_side)
        names = [n for n in pieces[0] if all(n in p for p in pieces)] if pieces else []
        read = [n for n in names if all(p[n] is not None for p in pieces)]
        budget.take(sum(len(p[n]) for p in pieces for n in read))
        return {n: [v for p in pieces for v in p[n]] if n in read else None for n in names}
    raise Refused(f"a Dataset backed by {short(name)}, which is not read here")


def arrow_table(obj, budget):
    """{name: values} of a pickled pyarrow Table: _reconstruct_table([chunked arrays], schema)."""
    name, args, _ = call_of(obj)
    if name != "_reconstruct_table" or len(args) < 2 or type(args[0]) is not list:
        raise Refused(f"a Dataset's table is {short(name)}, which is not read here")
    _, schema_args, _ = call_of(args[1])
    fields = schema_args[0] if schema_args and type(schema_args[0]) is list else []
    budget.take(STRUCTURE + len(fields))  # a table shared by many blocks is charged at each
    names = [call_of(f)[1][0] if call_of(f)[1] else None for f in fields]
    if len(names) != len(args[0]) or not all(type(n) is str for n in names):
        raise Refused("a Dataset's column names do not match its columns")
    return {n: arrow_values(c, budget) if n in (*budget.wanted, "indices") else None
            for n, c in zip(names, args[0])}


def dataset_columns(state, budget):
    """A datasets.Dataset: its in-memory Arrow table, with the row order of `.select`/`.shuffle`."""
    if type(state) is not dict:
        raise Refused("a Dataset without its state")
    columns = table_of(state.get("_data"), budget)
    if state.get("_indices") is not None:  # .select()/.shuffle() keep the table and a row mapping
        order = table_of(state["_indices"], budget).get("indices")
        rows = min((len(v) for v in columns.values() if v is not None), default=0)
        if order is None or not all(type(i) is int and 0 <= i < rows for i in order):
            raise Refused("a Dataset's row mapping is missing or points outside its table")
        read = [k for k, v in columns.items() if v is not None]
        budget.take(len(order) * len(read))
        columns = {k: v if v is None else budget.take_texts([v[i] for i in order])
                   for k, v in columns.items()}
    return columns


def frame_columns(state, budget):
    """A pandas DataFrame: BlockManager(blocks, axes); each block holds some columns, at
    `placement`.

    Only the blocks that hold `text` or `label` are read; every other column is skipped by its
    placement, whatever its dtype.
    """
    manager = state.get("_mgr") if type(state) is dict else None
    name, args, _ = call_of(manager)
    if name != "BlockManager" or len(args) != 2 or type(args[1]) is not list or len(args[1]) != 2:
        raise Refused("a DataFrame in a layout this reader does not know")
    blocks, (column_index, _) = args
    index_name, index_args, _ = call_of(column_index)
    index_kind = call_of(index_args[0])[0] if index_args else None
    if index_name != "_new_Index" or index_kind in ("MultiIndex", None):
        raise Refused("a DataFrame whose column names are not plain names (a MultiIndex?)",
                      fix="flatten the columns (df.columns = ['text', 'label', ...]), then pickle "
                          "it again")
    text = budget.wanted[0]
    if index_kind == "RangeIndex":  # pd.DataFrame(rows) without names: columns 0, 1, ...
        raise Refused(f"it has no `{text}` column (its columns are numbered, not named)",
                      fix=f"name them (df.columns = ['{text}', ...]), then pickle it again")
    names = values_of(column_index, budget)
    wanted = {n: names.index(n) for n in budget.wanted if n in names}
    if any(names.count(n) > 1 for n in wanted):
        raise Refused(f"it has two columns named `{'` or `'.join(budget.wanted)}`")
    columns = {n: None for n in names}
    for block in blocks if type(blocks) is tuple else ():
        positions, values = block_parts(block, len(names))
        budget.take(STRUCTURE + len(positions))  # a block shared by many places is charged at each
        keep = {row: n for n, at in wanted.items() for row, p in enumerate(positions) if p == at}
        if keep:
            columns.update(block_columns(values, len(positions), keep, budget))
    missing = [n for n in wanted if columns[n] is None]
    if missing:
        raise Refused(f"its `{missing[0]}` column has no data")
    return columns


def block_parts(block, width):
    """(column positions, values) of a pandas block: _unpickle_block(values, placement, ndim)."""
    name, args, _ = call_of(block)
    if name not in ("_unpickle_block", "new_block") or len(args) < 2:
        raise Refused(f"a DataFrame block is {short(name)}, which is not read here")
    values, placement = args[0], args[1]
    slice_name, slice_args, slice_state = call_of(placement)
    if slice_name == "slice" and len(slice_args) == 3 and all(type(a) is int for a in slice_args):
        positions = range(*slice_args)
    elif slice_name in ("_reconstruct", "_frombuffer"):  # positions, when not evenly spaced
        positions = numpy_array(slice_name, slice_args, slice_state, Budget(width), keep=None)[1]
    else:
        raise Refused("a DataFrame block's placement is neither a slice nor positions")
    if len(positions) > width or not all(type(p) is int and 0 <= p < width for p in positions):
        raise Refused("a DataFrame block lies outside its frame")
    return list(positions), values


def block_columns(values, width, keep, budget):
    """{column name: values} of the rows `keep` ({row of the block: name}) of a block of `width`
    columns."""
    kind, args, state = call_of(values)
    if kind in ("_reconstruct", "_frombuffer"):  # a 2-D numpy block: one row of it per column
        shape, rows = numpy_array(kind, args, state, budget, keep=list(keep))
        if len(shape) != 2 or shape[0] != width:
            raise Refused("a DataFrame block's shape does not match its placement")
        return {name: rows[r] for r, name in keep.items()}
    if width != 1:
        raise Refused("a DataFrame extension block spans several columns")
    return {keep[0]: values_of(values, budget)}


READERS = {"csv": read_csv, "jsonl": read_jsonl, "parquet": read_parquet, "folder": read_folder,
           "pickle": read_pickled}

if __name__ == "__main__":
    child_main(*sys.argv[1:3])
