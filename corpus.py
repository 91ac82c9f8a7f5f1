"""Reading text corpora: .jsonl / .txt files (plain, .gz or .xz) into documents.

    files = find_input_files(["texts/", "more/*.jsonl.gz"], txt_mode="line", split="auto")
    for pieces, disk_bytes in iter_tasks(files, 1_000_000, max_docs=None):   # ~1 MB of whole lines
        for file_index, first_line, data in pieces:
            parsed = parse_piece(files[file_index].kind, data, first_line, "text")  # documents + skips

Nothing here holds a whole file: files are read in blocks of whole lines, and a bad record (bad
JSON, a missing or non-string text key, an empty line) is reported with its line number instead
of stopping the read. The train/val split is a hash of each document's bytes (is_val_document),
so it is the same on every machine and run. prepare.py runs this in parallel and tokenizes.
"""

from __future__ import annotations

import fnmatch
import glob
import gzip
import hashlib
import json
import lzma
import os
import sys
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator

COMPRESSED = (".gz", ".xz")  # read through the standard library's gzip and lzma
JSONL_SUFFIXES = tuple(s + c for s in (".jsonl", ".ndjson") for c in ("", *COMPRESSED))
TXT_SUFFIXES = tuple(".txt" + c for c in ("", *COMPRESSED))


class CorpusError(Exception):
    """An input that cannot be read (missing, unsupported, corrupt); the message says what to do."""


# ----------------------------------------------------------------------------- inputs


@dataclass
class InputFile:
    path: str
    kind: str  # "jsonl" | "txt" (one document per line) | "file" (whole file is one document)
    split: str  # "auto" (hash decides) | "train" | "val"
    size: int  # bytes on disk, for progress and sampling


def _input_kind(path: str, txt_mode: str) -> str | None:
    lower = path.lower()
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
                raise CorpusError(
                    f"Unsupported input file {arg}: prepare.py reads .jsonl, .txt and their .gz/.xz "
                    "versions (convert other formats, e.g. parquet, to .jsonl first)."
                )
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
            raise CorpusError(f"No .jsonl or .txt files (optionally .gz/.xz) found in {arg}; check the path.")
        if ignored:
            print(f"note: ignoring {len(ignored)} file(s) under {arg} that are not regular .jsonl/.txt(.gz/.xz) files, e.g. {ignored[0]}",
                  file=sys.stderr)
        paths.extend(found)
    seen, result = set(), []
    for p in paths:
        key = os.path.realpath(p)
        if key not in seen:
            seen.add(key)
            result.append(InputFile(p, _input_kind(p, txt_mode) or "", split, os.path.getsize(p)))
    return result


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


def iter_file_pieces(path: str, kind: str, piece_bytes: int, start: int = 0) -> Iterator[tuple[int, bytes, int]]:
    """Yield (first line number, block of whole lines, bytes read from disk so far) for one file.

    Each block is piece_bytes plus the rest of the line it stops in, so no record is ever split
    between blocks. A start offset (plain files only) skips ahead and drops the partial line there.
    """
    with open(path, "rb") as raw:
        ext = os.path.splitext(path.lower())[1]
        f: Any = gzip.GzipFile(fileobj=raw) if ext == ".gz" else lzma.LZMAFile(raw) if ext == ".xz" else raw
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
        except (EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError) as e:
            raise CorpusError(f"{path} cannot be decompressed ({e}); the file is truncated or corrupt: download or compress it again.") from None


def _cut_after_lines(data: bytes, n: int) -> bytes:
    """The first n lines of data."""
    pos = 0
    for _ in range(n):
        pos = data.find(b"\n", pos) + 1
        if pos == 0:
            return data
    return data[:pos]


def _count_records(data: bytes) -> int:
    return data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)


# One piece of work for a worker: (index into the file table, first line number, raw bytes).
Piece = tuple[int, int, bytes]


def iter_tasks(
    files: list[InputFile], task_bytes: int, max_docs: int | None
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
        for first_line, data, pos in iter_file_pieces(file.path, file.kind, task_bytes):
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
            task_size += len(data)
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
    docs: list[str] = field(default_factory=list)
    skips: list[tuple[int, str, str]] = field(default_factory=list)  # (line, reason, detail)
    invalid_utf8: int = 0


def parse_piece(kind: str, data: bytes, first_line: int, text_key: str) -> Parsed:
    """Turn one block of raw input into document strings plus skipped-record reports."""
    out = Parsed()
    if kind == "file":
        text, bad = _decode(data)
        out.invalid_utf8 += bad
        if text:
            out.docs.append(text)
        else:
            out.skips.append((first_line, "empty_text", "empty file"))
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
                out.skips.append((line_no, "empty_text", "empty line"))
            continue
        if not line.strip():
            out.skips.append((line_no, "blank_line", "blank line"))
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            out.skips.append((line_no, "bad_json", f"malformed JSON ({e.args[0] if e.args else e})"))
            continue
        except RecursionError:  # e.g. 100,000 nested [: not a document, and not worth a crash
            out.skips.append((line_no, "bad_json", "malformed JSON (nested too deeply)"))
            continue
        if not isinstance(obj, dict):
            out.skips.append((line_no, "not_an_object", f"JSON {type(obj).__name__}, not an object"))
        elif text_key not in obj:
            out.skips.append((line_no, "missing_text_key", f"no {text_key!r} key"))
        elif not isinstance(obj[text_key], str):
            out.skips.append((line_no, "text_not_string", f"{text_key!r} is {type(obj[text_key]).__name__}"))
        elif not obj[text_key]:
            out.skips.append((line_no, "empty_text", f"empty {text_key!r}"))
        else:
            out.docs.append(obj[text_key])
    return out


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
    files: list[InputFile], budget_bytes: int, text_key: str, threshold: int, max_docs: int | None
) -> Iterator[str]:
    """A bounded, deterministic sample of training documents for tokenizer training.

    Each file contributes in proportion to its size. Within a large plain file we read from 8
    evenly spaced offsets rather than only the head, so a corpus sorted by topic or source is not
    represented by its first few megabytes alone (compressed files cannot seek cheaply: head only).
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
            for first_line, data, pos in iter_file_pieces(file.path, file.kind, 1 << 20, start):
                if remaining_docs == 0 or quota <= 0 or (windows > 1 and pos - len(data) >= end):
                    break
                if remaining_docs > 0 and file.kind != "file":
                    data = _cut_after_lines(data, remaining_docs)
                parsed = parse_piece(file.kind, data, first_line, text_key)
                if remaining_docs > 0:
                    remaining_docs -= len(parsed.docs) + len(parsed.skips)
                for text in parsed.docs:
                    b, text, _ = utf8_document(text)
                    if file.split == "auto" and is_val_document(b, threshold):
                        continue
                    if len(b) > quota:  # e.g. one huge whole-file document: take its start
                        text = b[:quota].decode("utf-8", "ignore")
                    quota -= len(b)
                    yield text
                    if quota <= 0:
                        break
