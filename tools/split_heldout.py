"""Split a JSONL corpus into train and held-out files by whole works, for the quality benchmark
in docs/benchmarks.md: every line of a held-out work goes to HELDOUT, the rest to TRAIN, so the
validation text is by works the model never saw (not just unseen lines of seen works).

    python tools/split_heldout.py ../shared/data/ru_literature.jsonl \
        --manifest ../shared/data/ru_literature.manifest.tsv \
        --work "Chekhov/Палата №6" --work "Turgenev/Дворянское гнездо" \
        --train /tmp/train.jsonl --heldout /tmp/heldout.jsonl

The manifest is a TSV with a header naming at least `line`, `author` and `title` columns (line =
1-based line number in the JSONL file).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("corpus", help="the JSONL file")
    p.add_argument("--manifest", required=True, help="TSV with line, author and title columns")
    p.add_argument("--work", action="append", required=True, help="AUTHOR/TITLE of a work to hold out (repeat)")
    p.add_argument("--train", required=True, help="where the other lines go")
    p.add_argument("--heldout", required=True, help="where the held-out works' lines go")
    args = p.parse_args(argv)
    wanted = {tuple(w.split("/", 1)) for w in args.work}
    with open(args.manifest, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    held_lines = {int(r["line"]) for r in rows if (r["author"], r["title"]) in wanted}
    found = {(r["author"], r["title"]) for r in rows} & wanted
    if found != wanted:
        sys.exit(f"error: not in the manifest: {', '.join('/'.join(w) for w in sorted(wanted - found))}")
    for path in (args.train, args.heldout):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # e.g. a fresh /tmp/bench/
    counts = [0, 0]
    with open(args.corpus, encoding="utf-8") as src, open(args.train, "w", encoding="utf-8") as train, \
            open(args.heldout, "w", encoding="utf-8") as heldout:
        for number, line in enumerate(src, 1):
            held = number in held_lines
            (heldout if held else train).write(line)
            counts[held] += 1
    print(f"{counts[0]} lines to {args.train}, {counts[1]} lines ({len(wanted)} works) to {args.heldout}", file=sys.stderr)


if __name__ == "__main__":
    main()
