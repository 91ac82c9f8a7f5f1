"""Tokenizers: one Tokenizer interface over SentencePiece and tiktoken, and every way to make one.

    tok = load_tokenizer(meta["tokenizer"], data_dir)      # what a dataset or checkpoint records
    ids = tok.encode("Привет, мир"); text = tok.decode(ids)

What lives here:
- Tokenizer, load_tokenizer: load a tokenizer file (tokenizer.model / tokenizer.tiktoken) from
  the record prepare.py writes into meta.json and train.py into every checkpoint.
- resolve_tokenizer: interpret prepare.py's --tokenizer (sp:N, a .model or .tiktoken file, a
  named tiktoken encoding, hf:DIR), checked before any corpus is read.
- train_sentencepiece: the byte-fallback BPE that sp:N trains; it reserves the chat tokens.
- The chat template (ChatML, as Qwen uses): chat_ids turns a conversation into token ids and
  its loss mask for prepare.py, sample.py and the studio, CHATML_TEMPLATE is the same template
  in Jinja for Hugging Face exports, add_chat_tokens gives a tokenizer without chat tokens
  <|im_start|> and <|im_end|> at the next free ids.
- Hugging Face conversions, both ways: our tokenizer's pipeline as tokenizer.json
  (sentencepiece_tokenizer_json, tiktoken_tokenizer_json; hf.hf_tokenizer writes the files),
  and a local HF model's tokenizer as ours (import_hf_tokenizer, for prepare.py --tokenizer
  hf:DIR and export_hf.py --import_from).
  SentencePiece .model files are read with a tiny protobuf reader, so neither the protobuf nor
  the tokenizers package is needed.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import struct
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional

# Used for a bare .tiktoken file, which stores only ranks and not the regex it was trained with.
# This is the cl100k_base split pattern (contractions, letter runs, up to 3 digits, punctuation,
# newline runs, other whitespace); override it with --tiktoken_pattern.
DEFAULT_TIKTOKEN_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
ENDOFTEXT = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"  # ChatML's turn delimiters, one token each
TIKTOKEN_NAMES = ("gpt2", "r50k_base", "p50k_base", "p50k_edit", "cl100k_base", "o200k_base")
DOWNLOAD_TIMEOUT_S = 30.0  # tiktoken's own download has no timeout and can hang behind firewalls
OFFLINE_ENV = "HOMELLM_OFFLINE"  # set to 1 to never touch the network


class TokenizerError(RuntimeError):
    """A tokenizer cannot be created or loaded; the message is one sentence saying what to do."""


# ----------------------------------------------------------------------------- tokenizer


@dataclass
class Tokenizer:
    """One interface over SentencePiece and tiktoken, so train.py/sample.py need not care."""

    kind: str  # "sentencepiece" | "tiktoken"
    vocab_size: int
    eot_id: int  # appended after every document
    bos_id: int | None = None
    impl: Any = field(default=None, repr=False)  # SentencePieceProcessor | tiktoken.Encoding
    special_ids: frozenset[int] = field(default=frozenset(), repr=False)
    im_start_id: int | None = None  # the chat tokens (see chat_ids); None: not a chat tokenizer
    im_end_id: int | None = None

    def encode(self, text: str) -> list[int]:
        """Token ids of text, with no BOS and no EOT."""
        if self.kind == "sentencepiece":
            return self.impl.encode(text, out_type=int)
        # encode_ordinary: text that happens to contain "<|endoftext|>" stays plain text.
        return self.impl.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """encode() over a list; single-threaded because we parallelize with processes instead.
        (SentencePiece also accepts UTF-8 bytes here.)"""
        if self.kind == "sentencepiece":
            return self.impl.encode(texts, out_type=int, num_threads=1)
        encode = self.impl.encode_ordinary
        return [encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        """Inverse of encode; invalid UTF-8 byte sequences become U+FFFD.

        Special tokens decode as each library does: SentencePiece drops eos, tiktoken writes
        "<|endoftext|>". Split on eot_id first if you want documents.
        """
        ids = [int(i) for i in ids]
        if self.kind == "sentencepiece":
            return self.impl.decode(ids)
        return self.impl.decode(ids, errors="replace")


LONG_TEXT = 1 << 20  # characters (or UTF-8 bytes): longer texts are encoded piece by piece


def pieces_for_encoding(text: Any, encode: Any, piece_len: int = LONG_TEXT, window: int = 256) -> Iterator[tuple[Any, bool]]:
    """text (str, or UTF-8 bytes) in pieces of at most about piece_len, for encoding one at a
    time: a tokenizer's memory grows many times faster than its input (a 1 GB document made
    SentencePiece fail with bad_alloc). Each cut is placed where encoding the two sides apart
    gives the tokens of encoding them together, checked on a window around it (tokenizers
    decide tokens locally: pre-split pieces, whitespace runs): after a newline, else a space,
    in the last eighth of the piece. Yields (piece, clean); clean is False after a cut where
    no such place was found and the piece was cut at its end anyway (at a character boundary)."""
    newline, space = ("\n", " ") if isinstance(text, str) else (b"\n", b" ")

    def boundary(pos: int, step: int) -> int:  # the nearest UTF-8 character boundary
        while isinstance(text, bytes) and 0 < pos < len(text) and text[pos] & 0xC0 == 0x80:
            pos += step
        return pos

    def clean_cut(cut: int) -> bool:
        left, right = boundary(max(0, cut - window), 1), boundary(min(len(text), cut + window), -1)
        return list(encode(text[left:right])) == list(encode(text[left:cut])) + list(encode(text[cut:right]))

    start = 0
    while len(text) - start > piece_len:
        end, cut = start + piece_len, None
        for sep in (newline, space):
            pos = end
            for _ in range(16):  # candidates from the end back
                pos = text.rfind(sep, end - piece_len // 8, pos)
                if pos < 0:
                    break
                if clean_cut(pos + 1):
                    cut = pos + 1
                    break
            if cut is not None:
                break
        clean = cut is not None
        cut = cut if clean else boundary(end, -1)
        yield text[start:cut], clean
        start = cut
    yield text[start:], True


def load_tokenizer(info: dict, base_dir: str) -> Tokenizer:
    """Load the tokenizer described by meta["tokenizer"] from the dataset directory base_dir."""
    kind = info.get("kind")
    path = os.path.join(base_dir, info.get("file") or "")
    if kind not in ("sentencepiece", "tiktoken"):
        raise TokenizerError(f"Unknown tokenizer kind {kind!r} in meta.json; re-run prepare.py.")
    if not os.path.isfile(path):
        raise TokenizerError(f"Tokenizer file {path} is missing; re-run prepare.py for this dataset.")
    if kind == "sentencepiece":
        tok = load_sentencepiece(path, info.get("eot_id"), info.get("bos_id"))
    else:
        tok = make_tiktoken(info.get("name"), info["pat_str"], read_tiktoken_ranks(path), info["special_tokens"], info["eot_id"])
    chat = info.get("chat_tokens") or {}
    tok.im_start_id, tok.im_end_id = chat.get(IM_START), chat.get(IM_END)
    for token_id in (tok.im_start_id, tok.im_end_id):
        if token_id is not None and not (token_id in tok.special_ids and token_id < tok.vocab_size):
            raise TokenizerError(f"the chat token id {token_id} in meta.json is not a special token of {path}; re-run prepare.py.")
    return tok


def load_sentencepiece(path: str, eot_id: int | None = None, bos_id: int | None = None) -> Tokenizer:
    """A SentencePiece model; eot/bos default to the model's own eos/bos pieces, but a recorded
    eot_id wins (a model imported from elsewhere may end documents with another piece)."""
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=path)
    except Exception as e:  # sentencepiece raises OSError/RuntimeError with C++ text
        raise TokenizerError(f"Cannot load SentencePiece model {path} ({e}); pass a valid .model file.") from None
    if eot_id is None:
        if sp.eos_id() < 0:
            raise TokenizerError(
                f"SentencePiece model {path} has no eos token to end documents with; "
                "use a model trained with eos_id >= 0 or let prepare.py train one with sp:N."
            )
        eot_id, bos_id = sp.eos_id(), (sp.bos_id() if sp.bos_id() >= 0 else None)
    specials = frozenset(i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i))
    return Tokenizer("sentencepiece", sp.get_piece_size(), int(eot_id), bos_id, sp, specials)


def make_tiktoken(
    name: str | None, pat_str: str, ranks: dict[bytes, int], special_tokens: dict[str, int], eot_id: int
) -> Tokenizer:
    import tiktoken

    enc = tiktoken.Encoding(
        name=name or "homellm-local", pat_str=pat_str, mergeable_ranks=ranks, special_tokens=special_tokens
    )
    return Tokenizer("tiktoken", enc.n_vocab, eot_id, None, enc, frozenset(special_tokens.values()))


def read_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """Parse a .tiktoken file: one `base64(token bytes) rank` per line.

    We parse it ourselves instead of tiktoken.load.load_tiktoken_bpe, which also caches local
    files by path in the tiktoken cache and would then return stale ranks if the file changed.
    """
    ranks: dict[bytes, int] = {}
    try:
        with open(path, "rb") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
                except ValueError:
                    raise TokenizerError(
                        f"{path}:{line_no} is not a `base64-token rank` line; pass a valid .tiktoken file."
                    ) from None
    except OSError as e:
        raise TokenizerError(f"Cannot read tiktoken file {path} ({e.strerror}); check the path.") from None
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(
            f"{path} lacks {len(missing)} of the 256 single-byte tokens, so some text could not be "
            "encoded; pass a complete byte-level BPE .tiktoken file."
        )
    return ranks


def write_tiktoken_ranks(ranks: dict[bytes, int], path: str) -> None:
    with open(path, "wb") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")


@dataclass
class TokenizerPlan:
    """What --tokenizer asked for, validated before any real work starts."""

    spec: str
    kind: str  # "sentencepiece" | "tiktoken" | "hf" (converted by import_hf_tokenizer)
    train_vocab: int | None = None  # sp:N -> train a BPE with N pieces
    path: str | None = None  # local .model / .tiktoken file
    name: str | None = None  # named tiktoken encoding
    pat_str: str | None = None
    encoding: Any = field(default=None, repr=False)  # loaded named tiktoken encoding


def resolve_tokenizer(spec: str, tiktoken_pattern: str = DEFAULT_TIKTOKEN_PATTERN) -> TokenizerPlan:
    """Interpret --tokenizer: "sp:N", a SentencePiece .model path, a tiktoken name or .tiktoken path.

    Named tiktoken encodings are loaded right here (from the tiktoken cache, or downloaded with a
    timeout unless HOMELLM_OFFLINE=1), so an offline machine fails before any corpus is read.
    """
    m = re.fullmatch(r"sp:(\d+)", spec.strip())
    if m:
        n = int(m.group(1))
        if not 260 <= n <= 1_000_000:
            raise TokenizerError(
                f"--tokenizer {spec}: N must be between 260 (256 byte pieces + specials) and 1000000, "
                "e.g. sp:32000."
            )
        return TokenizerPlan(spec, "sentencepiece", train_vocab=n)
    if spec.startswith("hf:"):  # the tokenizer of a local Hugging Face model (continued pretraining)
        path = os.path.expanduser(spec[3:])
        if not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model")):
            raise TokenizerError(f"--tokenizer {spec}: {path} has no tokenizer.json or tokenizer.model; pass a local HF model directory.")
        return TokenizerPlan(spec, "hf", path=path)
    if spec in TIKTOKEN_NAMES:
        return TokenizerPlan(spec, "tiktoken", name=spec, encoding=_load_named_tiktoken(spec))
    if spec.endswith(".model") or spec.endswith(".tiktoken"):
        if not os.path.isfile(spec):
            raise TokenizerError(f"Tokenizer file {spec} does not exist; check the --tokenizer path.")
        if spec.endswith(".model"):
            return TokenizerPlan(spec, "sentencepiece", path=spec)
        return TokenizerPlan(spec, "tiktoken", path=spec, pat_str=tiktoken_pattern)
    raise TokenizerError(
        f"Unknown --tokenizer {spec!r}; use sp:N (e.g. sp:32000), a SentencePiece .model file, "
        f"a .tiktoken file, hf:DIR (a local Hugging Face model) or one of: {', '.join(TIKTOKEN_NAMES)}."
    )


def _tiktoken_cache_dir() -> str:
    # Mirrors tiktoken.load.read_file_cached, only to name the directory in error messages.
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return os.environ[var]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _load_named_tiktoken(name: str) -> Any:
    """tiktoken.get_encoding(name), but never hanging on the network and failing in one sentence."""
    import tiktoken
    import tiktoken.load
    import urllib.request

    # tiktoken looks in its cache and otherwise calls tiktoken.load.read_file, which downloads with
    # `requests` and no timeout. We swap in a fetcher that honours a timeout and the offline switch.
    original_read_file = tiktoken.load.read_file

    def read_file(blobpath: str) -> bytes:
        if "://" not in blobpath:
            return original_read_file(blobpath)
        if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
            raise OSError(f"{OFFLINE_ENV} is set")
        with urllib.request.urlopen(blobpath, timeout=DOWNLOAD_TIMEOUT_S) as response:
            return response.read()

    tiktoken.load.read_file = read_file
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise TokenizerError(
            f"Cannot load tiktoken encoding {name!r}: it is not in the tiktoken cache "
            f"({_tiktoken_cache_dir()}) and could not be downloaded ({reason}); use a local .tiktoken "
            "file, a machine where the encoding is cached, or --tokenizer sp:N."
        ) from None
    finally:
        tiktoken.load.read_file = original_read_file


SENTENCEPIECE_TRAINER_OPTIONS: dict[str, Any] = dict(
    model_type="bpe",
    byte_fallback=True,  # any byte sequence round-trips; no <unk> ever
    character_coverage=0.9995,  # rare characters fall back to bytes instead of wasting pieces
    split_digits=True,  # small models learn arithmetic-ish patterns better digit by digit
    # Keep the text exactly as given: no NFKC, no collapsing of spaces, no fake leading space.
    # Indentation in code and line breaks in prose must survive decode(encode(x)) == x.
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    allow_whitespace_only_pieces=True,  # "    " becomes one token: Python indentation is cheap
    # SentencePiece writes spaces as "▁"; if that piece is missing from the vocabulary (text
    # without spaces), spaces byte-fall-back to its UTF-8 bytes and decode as "▁", not " ".
    required_chars="\u2581",
    max_sentence_length=1 << 14,  # bytes; our sample pieces are at most ~4000 characters
    hard_vocab_limit=False,  # a tiny corpus yields fewer pieces instead of an error
    unk_id=0,
    eos_id=1,
    bos_id=-1,
    pad_id=-1,
    # Reserved for chat fine-tuning (ids 2 and 3): control pieces are never produced from text,
    # so a user who types "<|im_start|>" cannot forge a turn.
    control_symbols=[IM_START, IM_END],
    minloglevel=2,
)


def train_sentencepiece(texts: Iterable[str], vocab_size: int, path: str) -> None:
    """Train a byte-fallback BPE on texts (documents) and write the model to path."""
    import sentencepiece as spm

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentencepiece_sentences(texts),
            model_writer=model,
            vocab_size=vocab_size,
            num_threads=os.cpu_count() or 1,  # not --workers: the model file must not depend on it
            **SENTENCEPIECE_TRAINER_OPTIONS,
        )
    except RuntimeError as e:
        m = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", str(e))
        if m:
            raise TokenizerError(
                f"sp:{vocab_size} is too small for this text: it needs at least {m.group(2)} pieces "
                "(256 byte pieces, specials and the common characters); use a larger N."
            ) from None
        raise TokenizerError(f"SentencePiece training failed ({str(e).splitlines()[0]}).") from None
    with open(path, "wb") as f:
        f.write(model.getvalue())


def _sentencepiece_sentences(texts: Iterable[str], max_chars: int = 4000) -> Iterator[str]:
    # The trainer silently drops "sentences" longer than max_sentence_length, so long documents
    # are cut into pieces, at line breaks where possible. Newlines stay inside the pieces so the
    # trainer can learn tokens such as ":\n" or "\n\n".
    for text in texts:
        start = 0
        while start < len(text):
            end = min(len(text), start + max_chars)
            if end < len(text):
                cut = text.rfind("\n", start, end)
                if cut <= start:
                    cut = text.rfind(" ", start, end)
                if cut > start:
                    end = cut + 1
            yield text[start:end]
            start = end


# Text that must survive decode(encode(x)) == x: Cyrillic, tabs, space runs, CRLF, emoji.
_ROUNDTRIP_PROBE = "Съешь ещё\tthese  soft\n\n    def f(x):\r\n\t\treturn x  # 😀 ü\n"


def normalizes_text(tok: Tokenizer) -> bool:
    """True when decode(encode(x)) != x for ordinary text, i.e. the tokenizer normalizes."""
    return tok.decode(tok.encode(_ROUNDTRIP_PROBE)) != _ROUNDTRIP_PROBE


def save_tokenizer(plan: TokenizerPlan, out_dir: str) -> tuple[dict, Tokenizer]:
    """Put the tokenizer `plan` describes into out_dir as tokenizer.model / tokenizer.tiktoken and
    return its record (meta.json's "tokenizer") and the loaded tokenizer. For sp:N the trained
    out_dir/tokenizer.model must already be there (prepare.py trains it on its input)."""
    if plan.kind == "hf":
        info = {**import_hf_tokenizer(plan.path, out_dir), "spec": plan.spec}
        return info, load_tokenizer(info, out_dir)  # (import_hf_tokenizer found its chat tokens, if any)
    if plan.kind == "sentencepiece":
        target = os.path.join(out_dir, "tokenizer.model")
        if plan.train_vocab is None:
            load_sentencepiece(plan.path)  # a bad file is named as the user gave it, not as our temp copy
            shutil.copyfile(plan.path, target)
        tok = load_sentencepiece(target)
        info = dict(kind="sentencepiece", spec=plan.spec, file="tokenizer.model", name=None, pat_str=None,
                    special_tokens={}, eot_id=tok.eot_id, bos_id=tok.bos_id)
        return with_chat_tokens(info, tok), tok
    target = os.path.join(out_dir, "tokenizer.tiktoken")
    if plan.encoding is not None:  # named encoding: save its ranks so the dataset works offline
        enc = plan.encoding
        # tiktoken has no public accessors for these three; they exist since its first release.
        ranks, pat_str, specials = enc._mergeable_ranks, enc._pat_str, dict(enc._special_tokens)
        write_tiktoken_ranks(ranks, target)
        eot = specials[ENDOFTEXT] if ENDOFTEXT in specials else enc.eot_token
    else:  # bare file: only ranks; we add <|endoftext|> right after the last rank
        ranks = read_tiktoken_ranks(plan.path)
        shutil.copyfile(plan.path, target)
        pat_str, eot = plan.pat_str, max(ranks.values()) + 1
        specials = {ENDOFTEXT: eot}
    info = dict(kind="tiktoken", spec=plan.spec, file="tokenizer.tiktoken", name=plan.name,
                pat_str=pat_str, special_tokens=specials, eot_id=eot, bos_id=None)
    try:  # from the ranks in memory: re-reading a 200k-line file costs ~0.5 s
        tok = make_tiktoken(plan.name, pat_str, ranks, specials, eot)
    except ValueError as e:  # e.g. a bad --tiktoken_pattern regex
        raise TokenizerError(f"Cannot build the tiktoken encoding ({e}); check --tiktoken_pattern.") from None
    return with_chat_tokens(info, tok), tok


# ----------------------------------------------------------------------------- chat template

# The one chat template: ChatML, as Qwen uses it. Every turn is
#     <|im_start|>{role}\n{content}<|im_end|>\n
# and the prompt for a reply ends with <|im_start|>assistant\n. chat_ids builds it as token
# ids for training and sampling; CHATML_TEMPLATE is the same thing in Jinja for Hugging Face's
# apply_chat_template (tokenizer_config.json), and a test checks both give the same ids.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def chat_ids(tok: Tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """A conversation as token ids, and its loss mask: 1 on each assistant reply's tokens and
    its closing <|im_end|>, 0 on system and user turns and on the template's own tokens.

    messages: [{"role": "system"|"user"|"assistant", "content": str}, ...]. Each turn is
    [<|im_start|>] + encode(f"{role}\n{content}") + [<|im_end|>] + encode("\n"), with the two
    delimiters as ids: text that spells "<|im_start|>" stays text. add_generation_prompt ends
    with [<|im_start|>] + encode("assistant\n"), the prompt that a reply follows."""
    if tok.im_start_id is None or tok.im_end_id is None:
        raise TokenizerError("this tokenizer has no chat tokens <|im_start|>/<|im_end|>; prepare conversations with prepare.py "
                             "(it adds them) and fine-tune on them first")
    newline = tok.encode("\n")
    ids: list[int] = []
    mask: list[int] = []
    for message in messages:
        role, reply = message["role"], message["role"] == "assistant"
        body = tok.encode(f"{role}\n{message['content']}")
        head = _role_tokens(tok, body, role) if reply else len(body)
        ids += [tok.im_start_id, *body, tok.im_end_id, *newline]
        mask += [0] * (1 + head) + [1] * (len(body) - head) + [int(reply)] + [0] * len(newline)
    if add_generation_prompt:
        prompt = [tok.im_start_id, *tok.encode("assistant\n")]
        ids += prompt
        mask += [0] * len(prompt)
    return ids, mask


def _role_tokens(tok: Tokenizer, body: list[int], role: str) -> int:
    """How many leading tokens of encode(f"{role}\n{content}") spell only the role line. Almost
    always those of encode(f"{role}\n"); should a token merge the newline with the reply's
    first characters, it carries reply text and counts as the reply's."""
    head = tok.encode(f"{role}\n")
    if body[: len(head)] == head:
        return len(head)
    size = len(f"{role}\n".encode("utf-8"))
    k = 0
    while k < len(body) and len(tok.decode(body[: k + 1]).encode("utf-8")) <= size:
        k += 1
    return k


def add_chat_tokens(info: dict, base_dir: str) -> tuple[dict, int]:
    """Give the tokenizer of record `info` (its file in base_dir) the chat tokens if it lacks
    them, at the next free ids: appended as control pieces to a SentencePiece model (made before
    sp:N reserved them, or imported), as special tokens to a tiktoken encoding. Returns the
    updated record (with "chat_tokens") and how many ids were added (0 or 2)."""
    if info.get("chat_tokens"):
        return info, 0
    path = os.path.join(base_dir, info["file"])
    if info["kind"] == "sentencepiece":
        size = len(read_sentencepiece(path)["pieces"])
        with open(path, "ab") as f:  # repeated protobuf fields may continue anywhere: these become the last pieces
            f.write(b"".join(_sentencepiece_piece(text, SP_CONTROL) for text in (IM_START, IM_END)))
        added = {IM_START: size, IM_END: size + 1}
        info = {**info}
    else:
        specials = dict(info.get("special_tokens") or {})
        next_id = max([*read_tiktoken_ranks(path).values(), *specials.values()]) + 1
        added = {IM_START: next_id, IM_END: next_id + 1}
        info = {**info, "special_tokens": {**specials, **added}}
    return with_chat_tokens(info, load_tokenizer(info, base_dir)), len(added)


def with_chat_tokens(info: dict, tok: Tokenizer) -> dict:
    """info with "chat_tokens": {text: id} when the tokenizer holds both chat tokens as special
    (control) tokens, as its record must say before Tokenizer.im_start_id/im_end_id are set."""
    if tok.kind == "sentencepiece":
        found = {text: tok.impl.piece_to_id(text) for text in (IM_START, IM_END)}
        found = {text: i for text, i in found.items() if tok.impl.id_to_piece(i) == text and i in tok.special_ids}
    else:
        found = {text: i for text, i in (info.get("special_tokens") or {}).items() if text in (IM_START, IM_END)}
    if len(found) < 2:
        return info
    tok.im_start_id, tok.im_end_id = found[IM_START], found[IM_END]
    return {**info, "chat_tokens": found}


def _sentencepiece_piece(text: str, piece_type: int, score: float = 0.0) -> bytes:
    """One ModelProto.pieces entry (field 1: {1: piece, 2: score, 3: type}), serialized."""
    def length_delimited(field: int, data: bytes) -> bytes:
        return _varint_bytes(field << 3 | 2) + _varint_bytes(len(data)) + data

    piece = length_delimited(1, text.encode("utf-8")) + b"\x15" + struct.pack("<f", score) + b"\x18" + _varint_bytes(piece_type)
    return length_delimited(1, piece)


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append(value & 0x7F | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


# ----------------------------------------------------------------------------- Hugging Face: SentencePiece files


QWEN2_PAT_STR = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


# SentencePiece piece types (sentencepiece_model.proto).
SP_NORMAL, SP_UNKNOWN, SP_CONTROL, SP_USER_DEFINED, SP_UNUSED, SP_BYTE = 1, 2, 3, 4, 5, 6


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i += 1
        if byte < 0x80:
            return value, i
        shift += 7


def proto_fields(data: bytes) -> Iterator[tuple[int, object]]:
    """(field number, value) of one protobuf message: varints as int, length-delimited fields as
    bytes, 32-bit fields as float. Enough to read a tokenizer.model without the protobuf package."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 2:
            size, i = _varint(data, i)
            value, i = data[i : i + size], i + size
        elif wire == 5:
            value, i = struct.unpack("<f", data[i : i + 4])[0], i + 4
        elif wire == 1:
            value, i = data[i : i + 8], i + 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, value


def read_sentencepiece(path: str) -> dict:
    """The parts of a SentencePiece ModelProto that define encoding: pieces (text, score, type),
    the model type and the normalizer settings, with the proto's defaults filled in."""
    with open(path, "rb") as f:
        data = f.read()
    model = {"pieces": [], "model_type": "unigram", "byte_fallback": False, "charsmap": b"",
             "add_dummy_prefix": True, "remove_extra_whitespaces": True, "escape_whitespaces": True,
             "treat_whitespace_as_suffix": False, "denormalizer": b""}
    try:
        for number, value in proto_fields(data):
            if number == 1:  # repeated SentencePiece {1: piece, 2: score, 3: type}
                piece = {"piece": "", "score": 0.0, "type": SP_NORMAL}
                for f, v in proto_fields(value):
                    if f == 1:
                        piece["piece"] = v.decode("utf-8")
                    elif f == 2:
                        piece["score"] = v
                    elif f == 3:
                        piece["type"] = v
                model["pieces"].append(piece)
            elif number == 2:  # TrainerSpec
                for f, v in proto_fields(value):
                    if f == 3:
                        model["model_type"] = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}.get(v, str(v))
                    elif f == 24:
                        model["treat_whitespace_as_suffix"] = bool(v)
                    elif f == 35:
                        model["byte_fallback"] = bool(v)
            elif number == 3:  # NormalizerSpec
                for f, v in proto_fields(value):
                    if f == 2:
                        model["charsmap"] = v
                    elif f == 3:
                        model["add_dummy_prefix"] = bool(v)
                    elif f == 4:
                        model["remove_extra_whitespaces"] = bool(v)
                    elif f == 5:
                        model["escape_whitespaces"] = bool(v)
            elif number == 5:  # denormalizer NormalizerSpec
                model["denormalizer"] = dict(proto_fields(value)).get(2, b"")
    except (ValueError, IndexError, TypeError, AttributeError, struct.error):  # not a ModelProto
        raise TokenizerError(f"{path} is not a SentencePiece model file") from None
    if not model["pieces"]:
        raise TokenizerError(f"{path} is not a SentencePiece model file (it has no pieces)")
    return model


def sentencepiece_tokenizer_json(sp: dict) -> dict:
    """A tokenizer.json that reproduces SentencePiece's encode/decode.

    SentencePiece normalizes (precompiled char map, then drops leading/trailing spaces and
    collapses runs when remove_extra_whitespaces), prepends the "dummy prefix" space, turns
    spaces into U+2581 and segments the whole string: Viterbi over piece scores (unigram) or
    merging the adjacent pair whose result scores highest (bpe). Characters outside the vocab
    become <0xXX> byte pieces (byte_fallback). The same steps in `tokenizers` terms follow.
    """
    if sp["model_type"] not in ("unigram", "bpe"):
        raise TokenizerError(f"SentencePiece model_type {sp['model_type']} cannot be exported; train a unigram or bpe model")
    if sp["treat_whitespace_as_suffix"] or sp["denormalizer"]:
        raise TokenizerError("SentencePiece models with treat_whitespace_as_suffix or a denormalizer cannot be exported")
    pieces = sp["pieces"]
    normalizers = []
    if sp["charsmap"]:
        normalizers.append({"type": "Precompiled", "precompiled_charsmap": base64.b64encode(sp["charsmap"]).decode()})
    if sp["remove_extra_whitespaces"]:
        # Only the plain space, as in SentencePiece (tokenizers' Strip would also eat newlines).
        normalizers.append({"type": "Replace", "pattern": {"Regex": "^ +| +$"}, "content": ""})
        normalizers.append({"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "})
    if sp["add_dummy_prefix"]:
        # A normalizer, not Metaspace: Metaspace skips the prefix when the text already starts
        # with a space, SentencePiece does not.
        normalizers.append({"type": "Prepend", "prepend": " "})
    if sp["escape_whitespaces"]:
        normalizers.append({"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"})

    unk_id = next((i for i, p in enumerate(pieces) if p["type"] == SP_UNKNOWN), None)
    if sp["model_type"] == "unigram":
        model = {"type": "Unigram", "unk_id": unk_id, "vocab": [[p["piece"], p["score"]] for p in pieces],
                 "byte_fallback": sp["byte_fallback"]}
    else:
        # HF BPE applies listed merges by rank. SentencePiece merges any adjacent pair whose
        # concatenation is a piece, best score first, so list every split of every piece into
        # two pieces, ordered by the merged piece's score (ties: lower id first).
        mergeable = {p["piece"]: i for i, p in enumerate(pieces) if p["type"] == SP_NORMAL}
        merges = []
        for piece, i in sorted(mergeable.items(), key=lambda kv: (-pieces[kv[1]]["score"], kv[1])):
            for k in range(1, len(piece)):
                if piece[:k] in mergeable and piece[k:] in mergeable:
                    merges.append([piece[:k], piece[k:]])
        model = {"type": "BPE", "dropout": None, "unk_token": pieces[unk_id]["piece"] if unk_id is not None else None,
                 "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                 "byte_fallback": sp["byte_fallback"], "ignore_merges": False,
                 "vocab": {p["piece"]: i for i, p in enumerate(pieces)}, "merges": merges}

    # <unk>, <s>, </s> (and user-defined symbols) are matched as whole tokens, never split.
    added = [
        {"id": i, "content": p["piece"], "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": p["type"] != SP_USER_DEFINED}
        for i, p in enumerate(pieces) if p["type"] in (SP_UNKNOWN, SP_CONTROL, SP_USER_DEFINED)
    ]
    decoders = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}]
    if sp["add_dummy_prefix"]:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": None, "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": model,
    }


# ----------------------------------------------------------------------------- tiktoken files


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> character map used by every byte-level BPE tokenizer.json:
    printable Latin-1 bytes stand for themselves, the other 68 (space, control bytes, ...) are
    shifted to U+0100 and up, so each token is a printable string without spaces."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def bpe_split(token: bytes, ranks: dict[bytes, int], below: int) -> list[bytes]:
    """tiktoken's BPE on `token`'s bytes using only tokens ranked below `below`: repeatedly merge
    the adjacent pair whose concatenation has the lowest rank."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while True:
        best = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < below and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            return parts
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]


def onig_pattern(pat_str: str) -> str:
    """tiktoken's regex (Rust fancy-regex syntax) rewritten for tokenizers' Oniguruma engine.

    Two constructs read differently there: a possessive interval X{1,3}+ means (X{1,3})+ to
    Oniguruma (prepare.py's default pattern has \\p{N}{1,3}+: 12345 would stay one piece), and
    ^/$ are line anchors in Oniguruma but text anchors in tiktoken. The atomic group (?>X{1,3})
    and \\A/\\z mean the same in both. Everything else is passed through unchanged.
    """
    out: list[str] = []  # the pattern as atoms; out[-1] is what a quantifier applies to
    i = 0
    while i < len(pat_str):
        c = pat_str[i]
        interval = re.match(r"\{\d+(,\d*)?\}\+", pat_str[i:]) if c == "{" else None
        if c == "\\":
            j = i + 2
            if pat_str[i + 1 : j] in ("p", "P", "x") and pat_str[j : j + 1] == "{":  # \p{L}, \x{263A}
                j = pat_str.index("}", j) + 1
        elif c == "[":
            j = _class_end(pat_str, i)
        elif interval:
            if not out or out[-1] in ("(", ")", "|"):
                raise TokenizerError(f"cannot translate the possessive {interval.group()} in pat_str {pat_str!r} for tokenizers; "
                              "write it without the trailing + or as an atomic group (?>...)")
            out[-1] = f"(?>{out[-1]}{interval.group()[:-1]})"
            i += interval.end()
            continue
        else:
            j = i + 1
        out.append({"^": "\\A", "$": "\\z"}.get(c, pat_str[i:j]))
        i = j
    return "".join(out)


def _class_end(pat: str, i: int) -> int:
    """Index just past the character class that starts at pat[i] == "[" (classes may nest)."""
    j = i + 1
    if pat[j : j + 1] == "^":
        j += 1
    if pat[j : j + 1] == "]":  # a leading ] is a literal
        j += 1
    while j < len(pat):
        if pat[j] == "\\":
            j += 2
        elif pat[j] == "[":
            j = _class_end(pat, j)
        elif pat[j] == "]":
            return j + 1
        else:
            j += 1
    raise TokenizerError(f"pat_str {pat!r} has an unclosed [ character class")


def tiktoken_tokenizer_json(ranks: dict[bytes, int], pat_str: str, special_tokens: dict[str, int]) -> dict:
    """A byte-level BPE tokenizer.json equivalent to a tiktoken encoding.

    tiktoken splits text with pat_str, then merges bytes within each piece, lowest-ranked
    result first; HF BPE applies the explicit merge list of byte_level_merges instead, with
    ignore_merges so that a whole piece equal to a token is emitted as it, as tiktoken does.
    """
    byte_char = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(byte_char[b] for b in token)

    merges = [[text(left), text(right)] for left, right in byte_level_merges(ranks)]
    added = [
        {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        for s, i in sorted(special_tokens.items(), key=lambda kv: kv[1])
    ]
    # The special tokens go into the vocab too, at their ids: `tokenizers` ignores the id of an
    # added token that the vocab lacks and appends it at the next free id instead, which is a real
    # token when the special one sits first (GPT-2 style, id 0) or in a gap (cl100k).
    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab.update(special_tokens)
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": onig_pattern(pat_str)}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": merges},
    }


def byte_level_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list equivalent to tiktoken ranks, in rank order, for BPE implementations that
    apply explicit merges (tokenizers, llama.cpp). tiktoken merges the adjacent pair whose
    concatenation has the lowest rank; the merge that creates a token is found by running that
    BPE on the token's own bytes with only lower ranks allowed: it stops at exactly the two
    parts that the final merge joins. Tokens that BPE never reaches get no merge; like tiktoken,
    an implementation that ignores merges for whole pieces still emits them."""
    if len(set(ranks.values())) != len(ranks):
        raise TokenizerError("the tiktoken ranks are not unique; the tokenizer file is corrupt")
    if any(bytes([b]) not in ranks for b in range(256)):
        raise TokenizerError("the tiktoken encoding lacks some of the 256 single-byte tokens, so it cannot be byte-level BPE")
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            parts = bpe_split(token, ranks, rank)
            if len(parts) == 2:
                merges.append((parts[0], parts[1]))
    return merges


# ----------------------------------------------------------------------------- Hugging Face: export and import


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise TokenizerError(f"{path} is not valid JSON ({err})") from None


def special_token_text(value) -> Optional[str]:
    """tokenizer_config.json writes a special token as a string or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def import_hf_tokenizer(path: str, dest_dir: str) -> dict:
    """Convert the tokenizer of HF model directory `path` into dest_dir and return its record
    in meta.json's "tokenizer" format. A SentencePiece tokenizer.model is copied as is; a
    byte-level BPE tokenizer.json (Qwen2, Llama 3, GPT-2 style) becomes tokenizer.tiktoken:
    token ids are the ranks, the pre-tokenizer's regex is pat_str, added tokens are specials."""
    config = _read_json(os.path.join(path, "config.json")) if os.path.isfile(os.path.join(path, "config.json")) else {}
    tok_config_path = os.path.join(path, "tokenizer_config.json")
    tok_config = _read_json(tok_config_path) if os.path.isfile(tok_config_path) else {}
    os.makedirs(dest_dir, exist_ok=True)

    spm_path, json_path = os.path.join(path, "tokenizer.model"), os.path.join(path, "tokenizer.json")
    if os.path.isfile(spm_path) and _is_sentencepiece(spm_path):
        # The SentencePiece model is the original; HF's tokenizer.json is derived from it.
        pieces = read_sentencepiece(spm_path)["pieces"]
        ids = {p["piece"]: i for i, p in enumerate(pieces)}
        shutil.copyfile(spm_path, os.path.join(dest_dir, "tokenizer.model"))
        info = {"kind": "sentencepiece", "file": "tokenizer.model", "name": None, "pat_str": None, "special_tokens": {}}
    elif os.path.isfile(json_path):
        ranks, pat_str, special = byte_level_bpe_as_tiktoken(_read_json(json_path), json_path)
        write_tiktoken_ranks(ranks, os.path.join(dest_dir, "tokenizer.tiktoken"))
        byte_char = bytes_to_unicode()
        ids = {"".join(byte_char[b] for b in token): rank for token, rank in ranks.items()}
        ids.update(special)
        info = {"kind": "tiktoken", "file": "tokenizer.tiktoken", "name": None, "pat_str": pat_str, "special_tokens": special}
    else:
        raise TokenizerError(f"{path} has no tokenizer.model or tokenizer.json to import")

    def token_id(role: str) -> Optional[int]:
        """The tokenizer's bos/eos: by text from tokenizer_config.json (where null means none,
        as Qwen's bos), else config.json's id."""
        if f"{role}_token" in tok_config:
            text = special_token_text(tok_config[f"{role}_token"])
            if text is not None and text not in ids:
                raise TokenizerError(f"tokenizer_config.json's {role}_token {text!r} is not in the vocabulary")
            return ids.get(text)
        value = config.get(f"{role}_token_id")
        return value[0] if isinstance(value, list) and value else value if isinstance(value, int) else None

    eot_id = token_id("eos")
    if eot_id is None:
        raise TokenizerError(f"{path} names no eos token (tokenizer_config.json eos_token or config.json eos_token_id); "
                      "HomeLLM needs one to separate documents")
    info.update(spec=f"hf:{os.path.abspath(path)}", eot_id=eot_id, bos_id=token_id("bos"))
    return with_chat_tokens(info, load_tokenizer(info, dest_dir))  # a chat model (Qwen's) stays one


def _is_sentencepiece(path: str) -> bool:
    try:
        read_sentencepiece(path)
        return True
    except TokenizerError:
        return False  # e.g. Llama 3's original/tokenizer.model is a tiktoken file


# tokenizers' ByteLevel(use_regex=True) splits with GPT-2's pattern.
GPT2_PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_level_bpe_as_tiktoken(tok: dict, json_path: str) -> tuple[dict[bytes, int], str, dict[str, int]]:
    """(ranks, pat_str, special_tokens) of a byte-level BPE tokenizer.json, refusing anything
    tiktoken cannot reproduce."""
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise TokenizerError(f"{json_path} is not a byte-level BPE tokenizer (model {model.get('type')}); only those, or a "
                      "SentencePiece tokenizer.model, can be imported")
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        pat_str = GPT2_PAT_STR
    elif (kinds == ["Split", "ByteLevel"] and "Regex" in steps[0].get("pattern", {}) and steps[0].get("behavior") == "Isolated"
          and not steps[0].get("invert") and not steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space")):
        pat_str = steps[0]["pattern"]["Regex"]
    else:
        raise TokenizerError(f"{json_path} has pre_tokenizer {json.dumps(pre)[:200]}, which is not one regex split plus "
                      "ByteLevel; tiktoken cannot reproduce it")
    normalizer = tok.get("normalizer")
    if normalizer and normalizer.get("type") != "NFC":
        raise TokenizerError(f"{json_path} has normalizer {normalizer.get('type')}, which tiktoken cannot reproduce")
    if normalizer:
        warnings.warn(f"{json_path} NFC-normalizes text and tiktoken does not: text in other Unicode forms "
                      "(e.g. decomposed й) will be tokenized differently unless you NFC-normalize it first")

    char_byte = {c: b for b, c in bytes_to_unicode().items()}
    special = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    special_ids = set(special.values())
    ranks = {}
    for text, token_id in model.get("vocab", {}).items():
        if token_id in special_ids:
            continue  # e.g. GPT-2 keeps <|endoftext|> in the vocab too; tiktoken wants it special only
        try:
            ranks[bytes(char_byte[c] for c in text)] = token_id
        except KeyError:
            raise TokenizerError(f"{json_path} token {text!r} is not byte-level encoded; it is not a byte-level BPE tokenizer") from None
    # tiktoken merges by token rank; HF by merge order. They agree when merges create tokens
    # in id order, as in tokenizers that came from tiktoken (Qwen2, Llama 3) or GPT-2.
    merged_ids = [model["vocab"].get(_merge_text(m)) for m in model.get("merges", [])]
    if any(b is None or a is not None and b < a for a, b in zip([None] + merged_ids, merged_ids)):
        warnings.warn(f"{json_path}'s merge order differs from its token ids; tiktoken may split some words differently")
    return ranks, pat_str, special


def _merge_text(merge) -> str:
    left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
    return left + right
