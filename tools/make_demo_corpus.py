"""Build the built-in demo corpus, demo/ru_literature.jsonl.xz, and its demo/PROVENANCE.md.

A maintainer's tool, not part of the runtime: it reads the project's shared copy of classic
Russian literature (../shared/data/ru_literature.jsonl and its manifest, which a cloned repo
does not have) and picks the whole works listed below, every chunk of each, in the dataset's
order. The output is deterministic, so re-running it reproduces the committed files exactly.

    python tools/make_demo_corpus.py                         # rewrite demo/*
    python tools/make_demo_corpus.py --heldout_tsv works.tsv # also list the held-out works
"""

from __future__ import annotations

import argparse
import csv
import json
import lzma
import os
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Only authors who died long enough ago that their works are public domain everywhere
# (see PUBLIC_DOMAIN below); Gorky, in the dataset too, died in 1936 and is left out.
AUTHORS = {  # manifest name -> (name in Russian, born, died)
    "Pushkin": ("Александр Пушкин", 1799, 1837),
    "Lermontov": ("Михаил Лермонтов", 1814, 1841),
    "Gogol": ("Николай Гоголь", 1809, 1852),
    "Herzen": ("Александр Герцен", 1812, 1870),
    "Nekrasov": ("Николай Некрасов", 1821, 1878),
    "Turgenev": ("Иван Тургенев", 1818, 1883),
    "Dostoevsky": ("Фёдор Достоевский", 1821, 1881),
    "Chekhov": ("Антон Чехов", 1860, 1904),
    "Tolstoy": ("Лев Толстой", 1828, 1910),
    "Blok": ("Александр Блок", 1880, 1921),
    "Bryusov": ("Валерий Брюсов", 1873, 1924),
}

ALL = "*"  # "*poems": every work of that kind by the author, except HELDOUT_WORKS and TOO_LONG

# Well-known works, prose and verse, a little over 10 MB in all. Left out on purpose: works with
# modern editorial matter in the dataset's text (Anna Karenina ends with a 20th-century essay,
# one Bryusov story carries a compiler's note), works first published long after the author's
# death, and the held-out works below.
DEMO_WORKS: dict[str, list[str] | str] = {
    "Pushkin": [
        ALL + "poems",  # every poem, verse novel, verse tale and little tragedy
        "Капитанская дочка", "Повести Белкина", "Дубровский", "Египетские ночи",
        "Кирджали", "История села Горюхина",
    ],
    "Lermontov": [ALL + "poems", "Герой нашего времени", "Ашик-Кериб", "Штосс"],
    "Nekrasov": [ALL + "poems"],
    "Blok": [
        "Стихотворения. Книга первая (1898-1904)", "Стихотворения. Книга вторая (1904-1908)",
        "Двенадцать", "Скифы", "Соловьиный сад", "Возмездие",
        "Девушка розовой калитки и муравьиный царь", "Ни сны, ни явь", "Сказка о той, которая не поймет её",
        "Сограждане",
    ],
    "Gogol": [
        "Ревизор", "Шинель", "Нос", "Вий", "Невский проспект", "Записки сумасшедшего", "Старосветские помещики",
        "Повесть о том, как поссорился Иван Иванович с Иваном Никифоровичем", "Портрет", "Коляска",
    ],
    "Chekhov": [ALL + "prose"],
    "Dostoevsky": [
        "Белые ночи", "Записки из подполья", "Бедные люди", "Сон смешного человека", "Мальчик у Христа на ёлке",
        "Крокодил", "Честный вор", "Ёлка и свадьба", "Бобок",
    ],
    "Tolstoy": [
        "Смерть Ивана Ильича", "Кавказский пленник", "После бала", "Хозяин и работник", "Севастополь в декабре месяце",
        "Севастополь в мае", "Детство", "Алёша горшок", "Ягоды", "Праведный судья", "Работник Емельян и пустой барабан",
    ],
    "Turgenev": ["Отцы и дети", "Муму", "Ася", "Первая любовь", "Стихотворения в прозе"],
    "Herzen": ["Сорока-воровка", "Доктор Крупов"],
    "Bryusov": ["Республика Южного Креста", "В зеркале", "Последние страницы из дневника женщины", "В подземной тюрьме"],
}

# Whole works no demo model ever sees, for measuring bits per byte on unseen text
# (prose and verse, four authors, ~1.3 MB). They are never written into the repo.
HELDOUT_WORKS = [
    ("Chekhov", "Палата №6"),
    ("Turgenev", "Дворянское гнездо"),
    ("Blok", "Стихотворения. Книга третья (1907-1916)"),
    ("Nekrasov", "Русские женщины"),
]
TOO_LONG = {("Chekhov", "Драма на охоте")}  # a 0.6 MB novel would be a third of Chekhov's share

PUBLIC_DOMAIN = """\
**Why it is public domain.** Every author here died in 1924 or earlier, and every work was
first published before 1930: most in the author's lifetime, the rest (Pushkin's and Lermontov's
posthumous editions, Tolstoy's works of 1911-12, Blok's *Возмездие*) within a few years or
decades of the author's death. Russia protects a work for the author's life plus 70 years, and
a posthumously published one for 70 years from publication (Civil Code, art. 1281), so all of
these entered the Russian public domain by 1999 at the latest; the EU's life + 70 and the
Berne Convention's minimum of life + 50 give the same. Even the longest term anywhere, Mexico's
life + 100, ran out at the end of 2024 for Bryusov, the last of them to die. In the United
States every work first published before 1930 is in the public domain. The texts are the
digitized editions of the shared dataset, in modern spelling; besides the authors' words they
keep a few short notes of those editions (the authors' own footnotes, translations of foreign
phrases, a proofreading note in Blok's first book), which add no authorship of their own.
"""


def read_works(shared: Path) -> dict[tuple[str, str], dict]:
    """(author, title) -> {kind, source, lines, texts} for every work in the shared JSONL, in file order."""
    with open(shared / "ru_literature.manifest.tsv", encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f, delimiter="\t") if r["file"] == "ru_literature.jsonl"]
    with open(shared / "ru_literature.jsonl", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    assert len(rows) == len(texts), "the manifest and the JSONL disagree; is ../shared complete?"
    works: dict[tuple[str, str], dict] = {}
    for row, text in zip(rows, texts):
        assert len(text.encode("utf-8")) == int(row["bytes"]), row
        w = works.setdefault((row["author"], row["title"]), {"kind": row["kind"], "source": row["source_path"], "texts": []})
        assert w["kind"] == row["kind"] and int(row["chunk"]) == len(w["texts"]), row
        w["texts"].append(text)
    return works


def select(works: dict[tuple[str, str], dict]) -> list[tuple[str, str]]:
    heldout = set(HELDOUT_WORKS)
    wanted = []
    for key, work in works.items():
        author, title = key
        picks = DEMO_WORKS.get(author, [])
        if title in picks or (ALL + work["kind"] in picks and key not in heldout | TOO_LONG):
            wanted.append(key)
    named = {(a, t) for a, titles in DEMO_WORKS.items() for t in titles if not t.startswith(ALL)}
    missing = (named | heldout) - set(works)
    assert not missing, f"not in the dataset: {sorted(missing)}"
    assert not heldout & set(wanted)
    return wanted


def write_corpus(works: dict, chosen: list[tuple[str, str]], path: Path) -> None:
    lines = []
    for author, title in chosen:
        for text in works[author, title]["texts"]:
            lines.append(json.dumps({"author": author, "title": title, "text": text}, ensure_ascii=False) + "\n")
    data = "".join(lines).encode("utf-8")
    # xz -9e: about a quarter of the UTF-8 size; lzma is in every Python's standard library.
    path.write_bytes(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))


def write_provenance(works: dict, chosen: list[tuple[str, str]], corpus: Path, path: Path) -> None:
    total = sum(len(t.encode("utf-8")) for key in chosen for t in works[key]["texts"])
    chunks = sum(len(works[key]["texts"]) for key in chosen)
    by_kind = Counter()
    for key in chosen:
        by_kind[works[key]["kind"]] += sum(len(t.encode("utf-8")) for t in works[key]["texts"])
    kinds = ", ".join(f"{kind} {size / 1e6:.2f} MB" for kind, size in sorted(by_kind.items()))
    out = [
        "# The demo corpus: provenance",
        "",
        f"`{corpus.name}` is what `python prepare.py` trains on when no `--input` is given: "
        f"{len(chosen)} whole works by {len({a for a, _ in chosen})} Russian authors, "
        f"{chunks:,} documents (one JSON object per line: `author`, `title`, `text`), "
        f"{total / 1e6:.2f} MB of UTF-8 text ({kinds}), xz-compressed to {corpus.stat().st_size / 1e6:.2f} MB.",
        "",
        "**Source.** Every document is a chunk (at most ~16 KB, cut at paragraph or stanza boundaries) of",
        "a whole work in the project's shared copy of classic Russian literature",
        "(`ru_literature.jsonl`, where `ru_literature.manifest.tsv` names author, title and source file",
        "of each line). The \"source\" column is that file. `tools/make_demo_corpus.py` picked the works and",
        "wrote this file; every chunk of a chosen work is here, unchanged and in order.",
        "",
        PUBLIC_DOMAIN,
        "| author | lived | works | MB of text |",
        "|---|---|---|---|",
    ]
    by_author = sorted({a for a, _ in chosen}, key=lambda a: AUTHORS[a][2])
    for author in by_author:
        name, born, died = AUTHORS[author]
        keys = [k for k in chosen if k[0] == author]
        size = sum(len(t.encode("utf-8")) for k in keys for t in works[k]["texts"])
        out.append(f"| {name} | {born}–{died} | {len(keys)} | {size / 1e6:.2f} |")
    out += ["", "| author | lived | title | kind | documents | bytes | source |", "|---|---|---|---|---|---|---|"]
    for author, title in sorted(chosen, key=lambda k: (AUTHORS[k[0]][2], works[k]["kind"], k[1])):
        name, born, died = AUTHORS[author]
        w = works[author, title]
        size = sum(len(t.encode("utf-8")) for t in w["texts"])
        out.append(f"| {name} | {born}–{died} | {title} | {w['kind']} | {len(w['texts'])} | {size:,} | `{w['source']}` |")
    path.write_text("\n".join(out) + "\n", encoding="utf-8")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", default=str(REPO.parent / "shared" / "data"), help="folder with ru_literature.jsonl")
    p.add_argument("--out_dir", default=str(REPO / "demo"))
    p.add_argument("--heldout_tsv", default=None, help="also write the held-out works here (author<TAB>title)")
    args = p.parse_args()
    works = read_works(Path(args.shared))
    chosen = select(works)
    out = Path(args.out_dir)
    os.makedirs(out, exist_ok=True)
    corpus = out / "ru_literature.jsonl.xz"
    write_corpus(works, chosen, corpus)
    write_provenance(works, chosen, corpus, out / "PROVENANCE.md")
    if args.heldout_tsv:
        with open(args.heldout_tsv, "w", encoding="utf-8") as f:
            f.writelines(f"{a}\t{t}\n" for a, t in HELDOUT_WORKS)
    size = sum(len(t.encode("utf-8")) for key in chosen for t in works[key]["texts"])
    print(f"{len(chosen)} works, {size / 1e6:.2f} MB of text -> {corpus} ({corpus.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
