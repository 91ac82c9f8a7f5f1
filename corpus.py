"""Reading text corpora into documents: .jsonl / .txt files (plain, .gz, .xz or .zst) and
.parquet files.

    files = find_input_files(["texts/", "more/*.jsonl.zst", "web/*.parquet"], txt_mode="line", split="auto")
    for pieces, disk_bytes in iter_tasks(files, 1_000_000, max_docs=None, text_key="text"):  # ~1 MB each
        for file_index, first_line, data in pieces:
            for parsed in read_piece(files[file_index].kind, data, first_line, "text"):  # docs + skips
                ...

Nothing here holds a whole file. Text files are read in blocks of whole lines; a piece of a
parquet file is a run of its row groups (RowGroups), which the worker that gets it reads one
batch of rows at a time, so parquet is read in parallel over files and row groups. A bad record
(bad JSON, a missing, null or non-string text, an empty line, a malformed conversation) is
counted by reason and reported with its line or row number instead of stopping the read.
Conversations (chat data) are JSONL records {"messages": [{"role", "content"}, ...]} or
ShareGPT's {"conversations": [{"from", "value"}, ...]}. The train/val split is a hash of each
document's bytes (is_val_document), so it is the same on every machine and run. prepare.py runs
this in parallel and tokenizes.

pyarrow (parquet) and zstandard (.zst) are optional: only those inputs need them, and without
them find_input_files names the package to install.
"""

from __future__ import annotations

import fnmatch
import glob
import gzip
import hashlib
import importlib
import importlib.util
import io
import json
import lzma
import os
import sys
import zlib
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Union

COMPRESSED = (".gz", ".xz", ".zst")  # the standard library's gzip and lzma; zstandard (optional)
JSONL_SUFFIXES = tuple(s + c for s in (".jsonl", ".ndjson") for c in ("", *COMPRESSED))
TXT_SUFFIXES = tuple(".txt" + c for c in ("", *COMPRESSED))
PARQUET_SUFFIXES = (".parquet",)
SUFFIXES_TEXT = ".jsonl, .txt (optionally .gz, .xz or .zst) or .parquet"
# The optional packages some inputs need: (suffix, module to import, package to install).
OPTIONAL_PACKAGES = ((".parquet", "pyarrow.parquet", "pyarrow"), (".zst", "zstandard", "zstandard"))
MAX_EXAMPLES = 10  # skipped records reported by line per parsed piece; all are counted


class CorpusError(Exception):
    """An input that cannot be read (missing, unsupported, corrupt); the message says what to do."""


# ----------------------------------------------------------------------------- inputs


@dataclass
class InputFile:
    path: str
    kind: str  # "jsonl" | "txt" (one document per line) | "file" (whole file is one document) | "parquet"
    split: str  # "auto" (hash decides) | "train" | "val"
    size: int  # bytes on disk, for progress and sampling


def _input_kind(path: str, txt_mode: str) -> str | None:
    lower = path.lower()
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if lower.endswith(TXT_SUFFIXES):
        return "file" if txt_mode == "file" else "txt"
    return None


def find_input_files(args: list[str], txt_mode: str, split: str) -> list[InputFile]:
    """Expand files, directories (recursively) and globs into a sorted, de-duplicated file list.
    Only regular files are read: a FIFO or device would block the read (and prepare.py reads
    an input twice, to sample and to tokenize); directories are walked once each, so symlink
    loops end (see _walk)."""
    paths: list[str] = []
    for arg in args:
        if os.path.isfile(arg):
            if _input_kind(arg, txt_mode) is None:
                raise CorpusError(f"Unsupported input file {arg}: prepare.py reads {SUFFIXES_TEXT}; convert it to .jsonl first.")
            paths.append(arg)
            continue
        if os.path.exists(arg) and not os.path.isdir(arg):
            raise CorpusError(f"Input {arg} is not a regular file (a FIFO or a device?); prepare.py reads each input twice, so save it to a file first.")
        candidates = [arg] if os.path.isdir(arg) else _glob(arg)
        if not candidates:
            raise CorpusError(f"Input path {arg} does not exist; check --input/--val_input.")
        found, ignored = [], []
        for c in candidates:
            for f in [c] if not os.path.isdir(c) else sorted(path for path, is_dir in _walk(c) if not is_dir):
                (found if os.path.isfile(f) and _input_kind(f, txt_mode) else ignored).append(f)
        if not found:
            raise CorpusError(f"No {SUFFIXES_TEXT} files found in {arg}; check the path.")
        if ignored:
            print(f"note: ignoring {len(ignored)} file(s) under {arg} that are not regular files of a kind it reads ({SUFFIXES_TEXT}), e.g. {ignored[0]}",
                  file=sys.stderr)
        paths.extend(found)
    seen, result = set(), []
    for p in paths:
        key = os.path.realpath(p)
        if key not in seen:
            seen.add(key)
            result.append(InputFile(p, _input_kind(p, txt_mode) or "", split, os.path.getsize(p)))
    for suffix, module, package, needs in _optional_needs(result):
        # find_spec: checked, but imported only where used (pyarrow alone takes ~0.1 s)
        if importlib.util.find_spec(package) is None:
            raise CorpusError(missing_package(package, suffix, needs))
    return result


def _optional_needs(files: list[InputFile]) -> Iterator[tuple[str, str, str, str]]:
    """(suffix, module, package, the first file that needs it) of each optional reader these files need."""
    for suffix, module, package in OPTIONAL_PACKAGES:
        needs = next((f.path for f in files if f.path.lower().endswith(suffix)), None)
        if needs:
            yield suffix, module, package, needs


def missing_package(package: str, suffix: str, path: str) -> str:
    return f"reading {suffix} files ({path}) needs the {package} package, which is not installed: pip install {package}"


def preload_readers(files: list[InputFile]) -> None:
    """Import the optional modules that reading `files` needs now, e.g. before forking workers,
    which then inherit them instead of each importing pyarrow (~0.1 s) on its first task."""
    for suffix, module, package, needs in _optional_needs(files):
        _optional(module, package, suffix, needs)


def _optional(module: str, package: str, suffix: str, path: str) -> Any:
    """Import an optional reader's module, or a CorpusError that names the package to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise CorpusError(missing_package(package, suffix, path)) from None


def _walk(root: str) -> Iterator[tuple[str, bool]]:
    """(path, is_dir) of everything under root, sorted, hidden names skipped. Symlinked
    directories are followed, but each real directory is entered once: a link back up the
    tree (a loop) would otherwise make the walk endless."""
    entered = {os.path.realpath(root)}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and os.path.realpath(os.path.join(dirpath, d)) not in entered)
        entered.update(os.path.realpath(os.path.join(dirpath, d)) for d in dirnames)
        yield from ((os.path.join(dirpath, d), True) for d in dirnames)
        yield from ((os.path.join(dirpath, f), False) for f in sorted(filenames) if not f.startswith("."))


def _glob(pattern: str) -> list[str]:
    """glob.glob(pattern, recursive=True), but a "**" walks with _walk: glob's own recursion
    follows symlinked directories into loops, without end (exponentially, with two links)."""
    if "**" not in pattern:
        return sorted(glob.glob(pattern))
    parts = pattern.split(os.sep)
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    root, wanted = os.sep.join(parts[:fixed]) or (os.sep if pattern.startswith(os.sep) else "."), parts[fixed:]
    if not os.path.isdir(root):
        return []
    found = [path for path, _ in _walk(root) if _matches(os.path.relpath(path, root).split(os.sep), wanted)]
    return sorted(found if root != "." else [os.path.relpath(path) for path in found])


def _matches(names: list[str], patterns: list[str]) -> bool:
    """Path components against glob components, "**" standing for any number of them."""
    if not patterns:
        return not names
    if patterns[0] == "**":
        return any(_matches(names[i:], patterns[1:]) for i in range(len(names) + 1))
    return bool(names) and fnmatch.fnmatchcase(names[0], patterns[0]) and _matches(names[1:], patterns[1:])


@dataclass(frozen=True)
class RowGroups:
    """A piece of a parquet file: `rows` rows of row groups [start, stop) of `path`, after the
    first `skip` rows (a large row group is cut into several pieces; --max_docs may cut the last
    piece short). The worker that gets it opens the file and reads the rows itself, one batch at
    a time."""

    path: str
    start: int
    stop: int
    rows: int
    nbytes: int  # uncompressed size of the piece's text: its weight
    skip: int = 0


# A piece's data: a block of whole lines (text files) or row groups (parquet).
PieceData = Union[bytes, RowGroups]


def iter_file_pieces(
    path: str, kind: str, piece_bytes: int, start: int = 0, text_key: str = "text"
) -> Iterator[tuple[int, PieceData, int]]:
    """Yield (first line number, block of whole lines, bytes read from disk so far) for one file.

    Each block is piece_bytes plus the rest of the line it stops in, so no record is ever split
    between blocks. A start offset (plain files only) skips ahead and drops the partial line there.
    A parquet file yields runs of whole row groups instead (see iter_parquet_pieces).
    """
    if kind == "parquet":
        yield from iter_parquet_pieces(path, piece_bytes, start, text_key)
        return
    with open(path, "rb") as raw:
        ext = os.path.splitext(path.lower())[1]
        f: Any = raw
        if ext == ".gz":
            f = gzip.GzipFile(fileobj=raw)
        elif ext == ".xz":
            f = lzma.LZMAFile(raw)
        elif ext == ".zst":
            f = io.BufferedReader(ZstdFrames(raw, path), 1 << 20)
        try:
            if kind == "file":  # the whole file is one document by definition
                yield 1, f.read(), raw.tell()
                return
            if start:
                raw.seek(start)
                raw.readline()
            line = 1
            while True:
                block = f.read(piece_bytes)
                if not block:
                    return
                if not block.endswith(b"\n"):
                    block += f.readline()
                yield line, block, raw.tell()
                line += block.count(b"\n")
        except (EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError, ZstdFrames.Error) as e:
            raise CorpusError(f"{path} cannot be decompressed ({e}); the file is truncated or corrupt: download or compress it again.") from None


class ZstdFrames(io.RawIOBase):
    """The decompressed bytes of a .zst file, frame after frame (zstd files may be concatenated).
    zstandard's own stream reader simply stops where a truncated file ends, so a download cut
    short would pass for a complete corpus; here a file that ends inside a frame raises."""

    class Error(Exception):
        pass

    def __init__(self, raw: Any, path: str):
        self.zstd = _optional("zstandard", "zstandard", ".zst", path)
        self.raw, self.frame = raw, None
        self.out, self.pos = memoryview(b""), 0  # decompressed bytes not yet handed out: out[pos:]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self.pos == len(self.out):
            data = self.raw.read(1 << 18)
            if not data:
                if self.frame is not None and not self.frame.eof:
                    raise ZstdFrames.Error("the file ends inside a zstd frame")
                return 0
            parts = []
            try:
                while data:
                    if self.frame is None or self.frame.eof:
                        self.frame = self.zstd.ZstdDecompressor().decompressobj()
                    parts.append(self.frame.decompress(data))
                    data = self.frame.unused_data if self.frame.eof else b""
            except self.zstd.ZstdError as e:
                raise ZstdFrames.Error(str(e)) from None
            self.out, self.pos = memoryview(b"".join(parts)), 0
        n = min(len(buffer), len(self.out) - self.pos)
        buffer[:n] = self.out[self.pos : self.pos + n]
        self.pos += n
        return n


_PARQUET_OPEN: dict[str, Any] = {}  # this process's last opened parquet file: a worker's next piece is most often of it


def _parquet_file(path: str) -> Any:
    """An open pyarrow ParquetFile; a file that is not parquet (or is cut short) is a CorpusError.
    Column chunks are read through a 4 MB buffer rather than whole, so memory stays bounded
    however large a row group is."""
    if path in _PARQUET_OPEN:
        return _PARQUET_OPEN[path]
    pq = _optional("pyarrow.parquet", "pyarrow", ".parquet", path)
    try:
        pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 22)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a bad footer
        raise CorpusError(f"{path} is not a readable parquet file ({e}); download it again.") from None
    _PARQUET_OPEN.clear()  # (closes the previous file)
    _PARQUET_OPEN[path] = pf
    return pf


# A row group of several pieces' worth of text is cut into up to this many pieces, so that more
# than one worker reads it (a file written with pandas' defaults is one row group). A reader can
# only reach a piece's rows by decoding the group's earlier rows too: with 8 pieces, the group is
# decoded 4.5 times over, which costs ~5% of the tokenizer's time (docs/benchmarks.md).
MAX_PIECES_PER_GROUP = 8


def iter_parquet_pieces(path: str, piece_bytes: int, start: int, text_key: str) -> Iterator[tuple[int, RowGroups, int]]:
    """Runs of consecutive row groups of about piece_bytes of text each (a large group is cut in
    pieces, see MAX_PIECES_PER_GROUP), as (first row number, RowGroups, disk bytes so far). Only
    the footer is read here. start skips the row groups that lie before that offset."""
    meta = _parquet_file(path).metadata
    size, total_rows = os.path.getsize(path), max(1, meta.num_rows)
    names = [meta.schema.column(i).path for i in range(meta.num_columns)]
    column = names.index(text_key) if text_key in names else None
    group, row = 0, 1
    while group < meta.num_row_groups and size * (row - 1) // total_rows < start:
        row += meta.row_group(group).num_rows
        group += 1
    while group < meta.num_row_groups:
        stop, rows, nbytes = group, 0, 0
        while stop < meta.num_row_groups and (stop == group or nbytes < piece_bytes):
            rg = meta.row_group(stop)
            rows += rg.num_rows
            nbytes += rg.column(column).total_uncompressed_size if column is not None else rg.total_byte_size
            stop += 1
        parts = min(MAX_PIECES_PER_GROUP, nbytes // piece_bytes) if stop == group + 1 else 1
        for i in range(max(1, parts)):  # rows [skip, end) of the run
            skip, end = rows * i // max(1, parts), rows * (i + 1) // max(1, parts)
            piece = RowGroups(path, group, stop, end - skip, nbytes * (end - skip) // max(1, rows), skip)
            yield row + skip, piece, size * (row - 1 + end) // total_rows
        group, row = stop, row + rows


def _cut_after_lines(data: PieceData, n: int) -> PieceData:
    """The first n records of data."""
    if isinstance(data, RowGroups):
        return replace(data, rows=min(n, data.rows), nbytes=data.nbytes * min(n, data.rows) // max(1, data.rows))
    pos = 0
    for _ in range(n):
        pos = data.find(b"\n", pos) + 1
        if pos == 0:
            return data
    return data[:pos]


def _count_records(data: PieceData) -> int:
    if isinstance(data, RowGroups):
        return data.rows
    return data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)


# One piece of work for a worker: (index into the file table, first line or row number, data).
Piece = tuple[int, int, PieceData]


def iter_tasks(
    files: list[InputFile], task_bytes: int, max_docs: int | None, text_key: str = "text"
) -> Iterator[tuple[list[Piece], int]]:
    """Group the input into tasks of about task_bytes each; yields (pieces, disk bytes consumed).

    The grouping depends only on the input and task_bytes, never on the number of workers,
    which is what makes the output independent of --workers.
    """
    remaining = max_docs if max_docs is not None else -1
    task: list[Piece] = []
    task_size, disk = 0, 0
    for index, file in enumerate(files):
        last_pos = 0
        for first_line, data, pos in iter_file_pieces(file.path, file.kind, task_bytes, text_key=text_key):
            if remaining == 0:
                break
            if file.kind == "file":
                remaining -= 1
            elif remaining > 0:
                n = _count_records(data)
                if n > remaining:
                    data, n = _cut_after_lines(data, remaining), remaining
                remaining -= n
            task.append((index, first_line, data))
            task_size += data.nbytes if isinstance(data, RowGroups) else len(data)
            disk += pos - last_pos
            last_pos = pos
            if task_size >= task_bytes:
                yield task, disk
                task, task_size, disk = [], 0, 0
        if remaining == 0:
            break
    if task:
        yield task, disk


# ----------------------------------------------------------------------------- parsing


@dataclass
class Parsed:
    """Documents read from one piece (or one batch of parquet rows), and what was skipped."""

    docs: list[Any] = field(default_factory=list)  # str documents, or conversations (fmt="chat")
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> records
    examples: list[tuple[int, str, str]] = field(default_factory=list)  # (line or row, reason, detail), the first few
    invalid_utf8: int = 0

    def skip(self, line: int, reason: str, detail: str, count: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + count
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append((line, reason, detail))


def read_piece(kind: str, data: PieceData, first_line: int, text_key: str, as_bytes: bool = False, fmt: str = "text") -> Iterator[Parsed]:
    """The documents of one piece: one Parsed for a block of lines; for parquet row groups one
    per batch of about 1 MB of text, so a worker never holds a large row group's text at once.
    as_bytes: parquet documents may come as their UTF-8 bytes (checked), for a tokenizer that
    takes bytes; documents of text files are always str. fmt="chat": conversations (JSONL only,
    see check_chat_inputs)."""
    if isinstance(data, RowGroups):
        yield from read_row_groups(data, first_line, text_key, as_bytes)
    else:
        yield parse_piece(kind, data, first_line, text_key, fmt)


def parse_piece(kind: str, data: bytes, first_line: int, text_key: str, fmt: str = "text") -> Parsed:
    """Turn one block of raw input into documents (fmt="chat": conversations, see
    parse_conversation) plus skipped-record reports."""
    out = Parsed()
    if kind == "file":
        text, bad = _decode(data)
        out.invalid_utf8 += bad
        if text:
            out.docs.append(text)
        else:
            out.skip(first_line, "empty_text", "empty file")
        return out
    try:  # fast path: the whole block is valid UTF-8
        lines = data.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        lines = []
        for raw_line in data.split(b"\n"):
            text, bad = _decode(raw_line)
            out.invalid_utf8 += bad
            lines.append(text)
    if data.endswith(b"\n"):
        lines.pop()  # the empty string after the final newline is not a record
    for offset, line in enumerate(lines):
        line_no = first_line + offset
        if kind == "txt":
            if line.endswith("\r"):
                line = line[:-1]  # CRLF files: the \r belongs to the line ending
            if line:
                out.docs.append(line)
            else:
                out.skip(line_no, "empty_text", "empty line")
            continue
        if not line.strip():
            out.skip(line_no, "blank_line", "blank line")
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            out.skip(line_no, "bad_json", f"malformed JSON ({e.args[0] if e.args else e})")
            continue
        except RecursionError:  # e.g. 100,000 nested [: not a document, and not worth a crash
            out.skip(line_no, "bad_json", "malformed JSON (nested too deeply)")
            continue
        if not isinstance(obj, dict):
            out.skip(line_no, "not_an_object", f"JSON {type(obj).__name__}, not an object")
        elif fmt == "chat":
            messages, problem = parse_conversation(obj)
            if messages is None:
                out.skip(line_no, *problem)
            else:
                out.docs.append(messages)
        elif text_key not in obj:
            out.skip(line_no, "missing_text_key", f"no {text_key!r} key")
        else:
            _add_text(out, obj[text_key], line_no, text_key)
    return out


def _add_text(out: Parsed, value: Any, line_no: int, text_key: str) -> None:
    """One record's text value: a document, or a skip counted by why it is none."""
    if isinstance(value, str) and value:
        out.docs.append(value)
    elif value is None:
        out.skip(line_no, "null_text", f"{text_key!r} is null")
    elif not isinstance(value, str):
        out.skip(line_no, "text_not_string", f"{text_key!r} is {type(value).__name__}")
    else:
        out.skip(line_no, "empty_text", f"empty {text_key!r}")


def read_row_groups(groups: RowGroups, first_row: int, text_key: str, as_bytes: bool = False, batch_bytes: int = 1 << 20) -> Iterator[Parsed]:
    """The text column of a run of parquet row groups, one batch of rows at a time. A file
    without the column counts all its rows as missing_text_key; a column that holds no strings
    (numbers, bytes, ...) counts them as text_not_string, and nulls as null_text."""
    pf = _parquet_file(groups.path)
    if text_key not in pf.schema_arrow.names:
        out = Parsed()
        out.skip(first_row, "missing_text_key", f"no {text_key!r} column", count=groups.rows)
        yield out
        return
    batch_rows = max(1, groups.rows * batch_bytes // max(1, groups.nbytes))
    row, left, skip = first_row, groups.rows, groups.skip
    try:
        batches = pf.iter_batches(batch_size=batch_rows, row_groups=range(groups.start, groups.stop), columns=[text_key], use_threads=False)
        for batch in batches:
            if skip >= len(batch):  # rows of the group that belong to an earlier piece
                skip -= len(batch)
                continue
            column = batch.column(0).slice(skip, left)
            skip = 0
            yield _parse_column(column, row, text_key, as_bytes)
            row, left = row + len(column), left - len(column)
            if left <= 0:
                return
    except CorpusError:
        raise
    except Exception as e:  # pyarrow's ArrowInvalid, OSError, ... for a damaged row group
        raise CorpusError(f"{groups.path}: cannot read row groups {groups.start}-{groups.stop - 1} ({e}); the file is corrupt: download it again.") from None


def _parse_column(column: Any, first_row: int, text_key: str, as_bytes: bool) -> Parsed:
    import pyarrow as pa

    out = Parsed()
    text_type = str
    utf8 = pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
    binary = pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary()
    try:
        column.validate(full=True)  # parquet readers do not check UTF-8; this does, in C++
        if as_bytes and utf8:  # the bytes as stored: no str to build, and none to encode again
            values, text_type = column.cast(binary).to_pylist(), bytes
        else:
            values = column.to_pylist()  # str for string columns, None for nulls
    except pa.ArrowInvalid:  # invalid UTF-8: decode row by row with replacement, as text files
        values = []
        for raw in column.cast(binary).to_pylist():
            text, bad = _decode(raw) if raw is not None else (None, 0)
            out.invalid_utf8 += bad
            values.append(text)
    if all(isinstance(v, text_type) and v for v in values):  # the common case: every row is a document
        out.docs = values
        return out
    for offset, value in enumerate(values):
        if isinstance(value, bytes) and text_type is bytes:
            value = value.decode()  # a row beside nulls or empty ones: rare, str is simpler
        _add_text(out, value, first_row + offset, text_key)
    return out


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
CHAT_ROLES = ("system", "user", "assistant")


def parse_conversation(obj: dict) -> tuple[list[dict] | None, tuple[str, str]]:
    """A chat record as [{"role", "content"}, ...] (ShareGPT's from/value mapped to role and
    content), or None and (reason, detail) saying why it is skipped."""
    sharegpt = "messages" not in obj and "conversations" in obj
    key, role_key, content_key = ("conversations", "from", "value") if sharegpt else ("messages", "role", "content")
    if key not in obj:
        return None, ("no_messages", "no 'messages' (or ShareGPT 'conversations') key")
    if not isinstance(obj[key], list):
        return None, ("messages_not_list", f"{key!r} is {type(obj[key]).__name__}, not a list")
    messages = []
    for turn in obj[key]:
        if not isinstance(turn, dict):
            return None, ("bad_message", f"a message is {type(turn).__name__}, not an object")
        role = turn.get(role_key)
        role = SHAREGPT_ROLES.get(role) if sharegpt and isinstance(role, str) else role
        if role not in CHAT_ROLES:
            return None, ("unknown_role", f"{role_key} {turn.get(role_key)!r} is not one of "
                          + ", ".join(r for r in SHAREGPT_ROLES if sharegpt or r in CHAT_ROLES))
        content = turn.get(content_key)
        if not isinstance(content, str):
            return None, ("content_not_string", f"{content_key!r} of a {role} message is {type(content).__name__}")
        if not content.strip():
            return None, ("empty_content", f"a {role} message has empty {content_key!r}")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        return None, ("no_assistant_turn", "no assistant turn to learn from")
    return messages, ("", "")


def conversation_text(messages: list[dict]) -> str:
    """A conversation's text, role lines included: what the train/val hash and sp:N's sample
    see of it (the template's <|im_start|>/<|im_end|> are tokens, not text)."""
    return "".join(f"{m['role']}\n{m['content']}\n" for m in messages)


def detect_format(files: list[InputFile]) -> str:
    """"chat" when the first record of the first .jsonl input is a conversation (has a
    "messages" or "conversations" key), else "text"."""
    for file in files:
        if file.kind != "jsonl":
            continue
        for _, data, _ in iter_file_pieces(file.path, file.kind, 1 << 16):
            for line in data.split(b"\n"):
                if line.strip():
                    try:
                        obj = json.loads(line)
                    except (ValueError, RecursionError):
                        return "text"
                    return "chat" if isinstance(obj, dict) and ("messages" in obj or "conversations" in obj) else "text"
    return "text"


def _decode(data: bytes) -> tuple[str, int]:
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        return data.decode("utf-8", "replace"), 1


def utf8_document(text: str) -> tuple[bytes, str, int]:
    """UTF-8 bytes of a document; JSON escapes can smuggle in unpaired surrogates, which are
    not encodable, so those become U+FFFD (and are counted like invalid UTF-8)."""
    try:
        return text.encode("utf-8"), text, 0
    except UnicodeEncodeError:
        fixed = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return fixed.encode("utf-8"), fixed, 1


def is_val_document(text_bytes: bytes, threshold: int) -> bool:
    """Deterministic split: a document is in val when a hash of its bytes falls below threshold.

    blake2b, unlike hash(), is stable across runs and machines; identical documents always land
    in the same split, so exact duplicates cannot leak from train into val.
    """
    digest = hashlib.blake2b(text_bytes, digest_size=8).digest()
    return int.from_bytes(digest, "little") < threshold


def val_threshold(fraction: float) -> int:
    return int(fraction * 2**64)


def sample_documents(
    files: list[InputFile], budget_bytes: int, text_key: str, threshold: int, max_docs: int | None, fmt: str = "text"
) -> Iterator[str]:
    """A bounded, deterministic sample of training documents for tokenizer training.

    Each file contributes in proportion to its size. Within a large plain or parquet file we read
    from 8 evenly spaced offsets (row groups) rather than only the head, so a corpus sorted by
    topic or source is not represented by its first few megabytes alone (compressed text files
    cannot seek cheaply: head only).
    Validation documents are left out.
    """
    total = sum(f.size for f in files) or 1
    remaining_docs = max_docs if max_docs is not None else -1
    for file in files:
        if file.split == "val":
            continue
        share = budget_bytes if total <= budget_bytes else int(budget_bytes * file.size / total)
        windows = 1
        if max_docs is None and file.kind != "file" and not file.path.lower().endswith(COMPRESSED) and share < file.size:
            windows = 8
        for w in range(windows):
            quota = share // windows
            start, end = file.size * w // windows, file.size * (w + 1) // windows
            piece_start = start
            for first_line, data, pos in iter_file_pieces(file.path, file.kind, 1 << 20, start, text_key):
                if remaining_docs == 0 or quota <= 0 or (windows > 1 and piece_start >= end):
                    break
                piece_start = pos
                if remaining_docs > 0:
                    data = _cut_after_lines(data, remaining_docs) if file.kind != "file" else data
                    remaining_docs -= 1 if file.kind == "file" else _count_records(data)
                # Lazily: a large parquet row group is read only as far as the quota needs.
                for text in (d for parsed in read_piece(file.kind, data, first_line, text_key, fmt=fmt) for d in parsed.docs):
                    b, text, _ = utf8_document(text if fmt == "text" else conversation_text(text))
                    if file.split == "auto" and is_val_document(b, threshold):
                        continue
                    if len(b) > quota:  # e.g. one huge whole-file document: take its start
                        text = b[:quota].decode("utf-8", "ignore")
                    quota -= len(b)
                    yield text
                    if quota <= 0:
                        break
