"""Move models between HomeLLM and the Hugging Face format, both ways.

Export a checkpoint so that transformers, vLLM or llama.cpp's convert_hf_to_gguf.py can use it:

    python export_hf.py --out_dir out --to hf_model/            # out/ckpt.pt -> hf_model/
    python export_hf.py --ckpt out/ckpt_002000.pt --to hf_model/ --dtype bfloat16

hf_model/ then holds config.json (LlamaForCausalLM; Qwen2ForCausalLM for a model with q/k/v biases
and Qwen's tokenizer, see exports_as_qwen2), model.safetensors, generation_config.json and the
tokenizer (tokenizer.json plus tokenizer_config.json; a SentencePiece tokenizer.model is copied too). No custom code is needed:
AutoModelForCausalLM.from_pretrained("hf_model") and AutoTokenizer.from_pretrained("hf_model").

Import a local Hugging Face Llama or Qwen2 directory to continue pretraining it here:

    python export_hf.py --import_from ~/models/Qwen2.5-0.5B --to out-qwen

out-qwen/ then holds ckpt.pt (step 0, our checkpoint format) and the tokenizer converted to ours
(tokenizer.tiktoken for byte-level BPE tokenizers such as Qwen2 or Llama 3, tokenizer.model for
SentencePiece ones), so sample.py can sample from it and train.py can --init_from it.
train.py's --init_from hf:DIR calls load_hf_model() below directly.

The architectures are the same, so weights map one to one by name (model.py already uses HF's
names and its rotate-half RoPE layout: no q/k permutation). Only local directories are read;
nothing is downloaded. Needs the `safetensors` package for .safetensors files (pip install
safetensors); nothing else beyond torch.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import struct
import sys
import warnings
from typing import Iterator, NoReturn, Optional

import torch

from model import ModelConfig, Transformer
from prepare import TokenizerError, read_tiktoken_ranks, write_tiktoken_ranks
from sample import SampleError, find_checkpoint, load_checkpoint


class HFError(RuntimeError):
    """A problem the user can fix (bad path, unsupported model); main() prints it as one line."""


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Files an export writes, and the weight files a loader might pick up instead of ours; with
# --overwrite exactly these are removed first, so a stale shard cannot shadow the new weights.
HF_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
    "pytorch_model.bin", "pytorch_model.bin.index.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model",
)


# ----------------------------------------------------------------------------- parameter names


def hf_names(cfg: ModelConfig) -> dict[str, str]:
    """Our parameter name -> the HF Llama/Qwen2 name, for every tensor, lm_head included (the
    caller drops it when the embeddings are tied). q/k need no permutation: both sides rotate
    pairs (i, i + head_dim/2), and llama.cpp's converter expects exactly this HF layout."""
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}
    for i in range(cfg.n_layer):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        names[ours + "attn_norm.weight"] = hf + "input_layernorm.weight"
        names[ours + "mlp_norm.weight"] = hf + "post_attention_layernorm.weight"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names[f"{ours}attn.{proj}.weight"] = f"{hf}self_attn.{proj}.weight"
        if cfg.qkv_bias:
            for proj in ("q_proj", "k_proj", "v_proj"):
                names[f"{ours}attn.{proj}.bias"] = f"{hf}self_attn.{proj}.bias"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names[f"{ours}mlp.{proj}.weight"] = f"{hf}mlp.{proj}.weight"
    return names


def expected_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Shapes of our state dict, taken from model.py itself (on the meta device: no memory)."""
    with torch.device("meta"):
        return {name: t.shape for name, t in Transformer(cfg).state_dict().items()}


# ----------------------------------------------------------------------------- config.json


# Qwen2's pre-tokenizer regex (Qwen2/2.5 tokenizer.json and transformers' Qwen2Tokenizer).
QWEN2_PAT_STR = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def exports_as_qwen2(cfg: ModelConfig, tokenizer: dict) -> bool:
    """Qwen2ForCausalLM for q/k/v-bias models whose tokenizer is Qwen's own (e.g. an imported
    Qwen2.5). transformers >= 5 loads the tokenizer of every model_type=qwen2 directory as
    Qwen2Tokenizer, which rebuilds Qwen's pipeline (its regex, NFC) around the vocab and ignores
    tokenizer.json's, so any other tokenizer would come out wrong. Other q/k/v-bias models are
    written as LlamaForCausalLM with attention_bias and an all-zero o_proj bias: the same
    function, and AutoTokenizer then loads tokenizer.json as written."""
    return cfg.qkv_bias and tokenizer.get("kind") == "tiktoken" and tokenizer.get("pat_str") == QWEN2_PAT_STR


def hf_config(cfg: ModelConfig, qwen: bool, bos_id: Optional[int], eos_id: Optional[int], dtype: torch.dtype) -> dict:
    """config.json for Qwen2ForCausalLM (qwen) or LlamaForCausalLM (with attention_bias when
    q/k/v have biases)."""
    config = {
        "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen else "llama",
        "vocab_size": cfg.vocab_size,  # the model's, which may exceed the tokenizer's (padding)
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # Both spellings: transformers < 5, vLLM and llama.cpp read rope_theta/rope_scaling,
        # transformers 5 writes rope_parameters (and still accepts the old keys).
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),  # transformers < 5
        "dtype": str(dtype).removeprefix("torch."),  # transformers >= 5
    }
    if qwen:
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer)
    else:
        config.update(attention_bias=cfg.qkv_bias, mlp_bias=False, pretraining_tp=1)
    return config


def refuse(field: str, value, why: str) -> NoReturn:
    raise HFError(f"config.json has {field}={json.dumps(value)}, which HomeLLM does not implement ({why})")


def model_config_from_hf(hf: dict) -> ModelConfig:
    """Our ModelConfig from a HF Llama/Qwen2 config.json, refusing every feature model.py does
    not implement rather than importing a model that would silently compute something else."""
    model_type = hf.get("model_type")
    if model_type not in ("llama", "qwen2"):
        refuse("model_type", model_type, "only llama and qwen2 are supported")
    if hf.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", hf["hidden_act"], "the MLP is SwiGLU with silu")
    if hf.get("mlp_bias"):
        refuse("mlp_bias", hf["mlp_bias"], "the MLP has no biases")
    if (hf.get("pretraining_tp") or 1) > 1:
        refuse("pretraining_tp", hf["pretraining_tp"], "only pretraining_tp=1 is supported")
    if hf.get("use_sliding_window"):
        refuse("use_sliding_window", hf["use_sliding_window"], "attention is always over the full context")
    if any(kind != "full_attention" for kind in hf.get("layer_types") or []):
        refuse("layer_types", hf["layer_types"], "attention is always over the full context")
    for field in ("num_experts", "num_local_experts", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size"):
        if hf.get(field):
            refuse(field, hf[field], "mixture-of-experts layers are not implemented")
    if hf.get("quantization_config"):
        refuse("quantization_config", hf["quantization_config"].get("quant_method", "?"), "only unquantized weights can be imported")
    # RoPE: the old keys (rope_theta + rope_scaling) or transformers 5's rope_parameters.
    rope_theta = hf.get("rope_theta", 10000.0)
    for field in ("rope_scaling", "rope_parameters"):
        rope = hf.get(field)
        if rope is None:
            continue
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            refuse(field, rope, "only plain RoPE is implemented, no scaling")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            refuse(field, rope, "RoPE rotates the whole head")
        rope_theta = rope.get("rope_theta", rope_theta)
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(hf.get(field), int):
            raise HFError(f"config.json has no integer {field}; it is not a complete {model_type} config")
    n_head = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * n_head != hf["hidden_size"]:
        refuse("head_dim", head_dim, f"heads are hidden_size/num_attention_heads = {hf['hidden_size'] / n_head:g} wide")
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"],
            n_layer=hf["num_hidden_layers"],
            n_head=n_head,
            n_kv_head=hf.get("num_key_value_heads") or n_head,
            n_embd=hf["hidden_size"],
            ffn_hidden=hf["intermediate_size"],
            max_seq_len=hf.get("max_position_embeddings", 2048 if model_type == "llama" else 32768),
            rope_theta=float(rope_theta),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),  # both classes default to untied
            # Qwen2 always has q/k/v biases; Llama's attention_bias adds an o_proj bias too,
            # which load_hf_model accepts only when it is zero (as our exports write it).
            qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias")),
            dropout=0.0,
            init_std=float(hf.get("initializer_range", 0.02)),
        )
    except ValueError as err:
        raise HFError(f"config.json does not describe a model HomeLLM can build: {err}") from None


# ----------------------------------------------------------------------------- SentencePiece files


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
        for field, value in proto_fields(data):
            if field == 1:  # repeated SentencePiece {1: piece, 2: score, 3: type}
                piece = {"piece": "", "score": 0.0, "type": SP_NORMAL}
                for f, v in proto_fields(value):
                    if f == 1:
                        piece["piece"] = v.decode("utf-8")
                    elif f == 2:
                        piece["score"] = v
                    elif f == 3:
                        piece["type"] = v
                model["pieces"].append(piece)
            elif field == 2:  # TrainerSpec
                for f, v in proto_fields(value):
                    if f == 3:
                        model["model_type"] = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}.get(v, str(v))
                    elif f == 24:
                        model["treat_whitespace_as_suffix"] = bool(v)
                    elif f == 35:
                        model["byte_fallback"] = bool(v)
            elif field == 3:  # NormalizerSpec
                for f, v in proto_fields(value):
                    if f == 2:
                        model["charsmap"] = v
                    elif f == 3:
                        model["add_dummy_prefix"] = bool(v)
                    elif f == 4:
                        model["remove_extra_whitespaces"] = bool(v)
                    elif f == 5:
                        model["escape_whitespaces"] = bool(v)
            elif field == 5:  # denormalizer NormalizerSpec
                model["denormalizer"] = dict(proto_fields(value)).get(2, b"")
    except (ValueError, IndexError, TypeError, AttributeError, struct.error):  # not a ModelProto
        raise HFError(f"{path} is not a SentencePiece model file") from None
    if not model["pieces"]:
        raise HFError(f"{path} is not a SentencePiece model file (it has no pieces)")
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
        raise HFError(f"SentencePiece model_type {sp['model_type']} cannot be exported; train a unigram or bpe model")
    if sp["treat_whitespace_as_suffix"] or sp["denormalizer"]:
        raise HFError("SentencePiece models with treat_whitespace_as_suffix or a denormalizer cannot be exported")
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
                raise HFError(f"cannot translate the possessive {interval.group()} in pat_str {pat_str!r} for tokenizers; "
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
    raise HFError(f"pat_str {pat!r} has an unclosed [ character class")


def tiktoken_tokenizer_json(ranks: dict[bytes, int], pat_str: str, special_tokens: dict[str, int]) -> dict:
    """A byte-level BPE tokenizer.json equivalent to a tiktoken encoding.

    tiktoken splits text with pat_str, then merges bytes within each piece, lowest-ranked
    result first. HF BPE applies an explicit merge list instead; the merge that creates a token
    is found by running tiktoken's BPE on the token's own bytes with only lower ranks allowed:
    it stops at exactly the two parts that the final merge joins. Tokens that BPE never reaches
    get no merge; like tiktoken, ignore_merges still emits them when a whole piece equals one.
    """
    if len(set(ranks.values())) != len(ranks):
        raise HFError("the tiktoken ranks are not unique; the tokenizer file is corrupt")
    if any(bytes([b]) not in ranks for b in range(256)):
        raise HFError("the tiktoken encoding lacks some of the 256 single-byte tokens, so it cannot be byte-level BPE")
    byte_char = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(byte_char[b] for b in token)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            parts = bpe_split(token, ranks, rank)
            if len(parts) == 2:
                merges.append([text(parts[0]), text(parts[1])])
    added = [
        {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        for s, i in sorted(special_tokens.items(), key=lambda kv: kv[1])
    ]
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
                  "vocab": {text(token): rank for token, rank in ranks.items()}, "merges": merges},
    }


# ----------------------------------------------------------------------------- export


def prepare_dest(dest: str, overwrite: bool) -> None:
    """Refuse to write into a non-empty directory unless asked; then clear only our own files."""
    if os.path.isdir(dest) and os.listdir(dest):
        if not overwrite:
            raise HFError(f"{dest} is not empty; pass --overwrite to replace its files, or choose another --to")
        for name in os.listdir(dest):
            if name in HF_FILES or (name.startswith(("model-", "pytorch_model-")) and name.endswith((".safetensors", ".bin"))):
                os.remove(os.path.join(dest, name))
    os.makedirs(dest, exist_ok=True)


def write_json(obj: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig, qwen: bool, dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    """Our state dict under HF names, in dtype (None: as stored), ready for safetensors."""
    names = hf_names(cfg)
    if cfg.tie_embeddings:
        del names["lm_head.weight"]  # HF re-ties it from tie_word_embeddings
    missing = [k for k in names if k not in state]
    if missing:
        raise HFError(f"the checkpoint lacks {', '.join(missing[:3])}; it does not match its model_config")
    dtype = dtype or state["embed.weight"].dtype
    tensors = {hf: state[ours].detach().to(dtype).contiguous() for ours, hf in names.items()}
    if cfg.qkv_bias and not qwen:  # Llama's attention_bias also expects an o_proj bias
        for i in range(cfg.n_layer):
            tensors[f"model.layers.{i}.self_attn.o_proj.bias"] = torch.zeros(cfg.n_embd, dtype=dtype)
    return tensors


def tokenizer_file(info: dict, ckpt: dict, ckpt_path: str) -> str:
    """train.py copies the tokenizer file next to ckpt.pt; fall back to the data directory."""
    name = info.get("file")
    if not name:
        raise HFError(f"{ckpt_path} records no tokenizer file")
    candidates = [os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), name)]
    data_dir = (ckpt.get("train_config") or {}).get("data_dir") or (ckpt.get("data") or {}).get("data_dir")
    if data_dir:
        candidates.append(os.path.join(data_dir, name))
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise HFError(f"the tokenizer file {name} is missing (looked in {' and '.join(candidates)}); copy it next to the checkpoint")


def hf_tokenizer(info: dict, path: str, max_seq_len: int) -> tuple[dict, dict]:
    """(tokenizer.json, tokenizer_config.json) for our tokenizer record `info` and its file.
    eos is our eot token; bos only if the tokenizer has one; nothing is added when encoding."""
    eot_id, bos_id = info.get("eot_id"), info.get("bos_id")
    if info.get("kind") == "sentencepiece":
        sp = read_sentencepiece(path)
        tokenizer = sentencepiece_tokenizer_json(sp)
        id_to_text = {i: p["piece"] for i, p in enumerate(sp["pieces"])}
        unk = next((p["piece"] for p in sp["pieces"] if p["type"] == SP_UNKNOWN), None)
    elif info.get("kind") == "tiktoken":
        if not info.get("pat_str"):
            raise HFError("the checkpoint's tiktoken tokenizer record has no pat_str")
        ranks = read_tiktoken_ranks(path)
        special = info.get("special_tokens") or {}
        tokenizer = tiktoken_tokenizer_json(ranks, info["pat_str"], special)
        byte_char = bytes_to_unicode()
        id_to_text = {rank: "".join(byte_char[b] for b in token) for token, rank in ranks.items()}
        id_to_text.update({i: s for s, i in special.items()})
        unk = None
    else:
        raise HFError(f"unknown tokenizer kind {info.get('kind')!r} in the checkpoint")
    for role, token_id in (("eot_id", eot_id), ("bos_id", bos_id)):
        if token_id is not None and token_id not in id_to_text:
            raise HFError(f"the tokenizer's {role}={token_id} is not a token of {path}")
    config = {
        # The generic class loads tokenizer.json as is; LlamaTokenizer would rebuild its own
        # pipeline in transformers 5 and lose the normalizer and unigram scores.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": id_to_text[bos_id] if bos_id is not None else None,
        "eos_token": id_to_text[eot_id] if eot_id is not None else None,
        "unk_token": unk,
        "pad_token": None,
        # Our encode() adds nothing: documents are separated by eot in the data, not framed.
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # would change " ." into "." on decode
        "model_max_length": max_seq_len,
    }
    return tokenizer, config


def export_hf(ckpt_path: str, dest: str, dtype: Optional[torch.dtype] = None, overwrite: bool = False) -> None:
    """Write checkpoint `ckpt_path` as a Hugging Face model directory `dest`. dtype: the saved
    weights' dtype (None: the checkpoint's own, float32 for train.py's)."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise HFError("writing .safetensors needs the safetensors package: pip install safetensors") from None
    ckpt = load_checkpoint(ckpt_path)  # sample.py's: weights_only, clear errors
    try:
        cfg = ModelConfig.from_dict(ckpt["model_config"])
    except (TypeError, ValueError) as err:
        raise HFError(f"{ckpt_path} has an invalid model_config: {err}") from None
    info = ckpt.get("tokenizer")
    if not isinstance(info, dict):
        raise HFError(f"{ckpt_path} records no tokenizer; it was not written by train.py")
    if os.path.isfile(os.path.join(dest, "ckpt.pt")):
        raise HFError(f"{dest} holds a training checkpoint; export into a directory of its own")
    # Everything is converted and checked before the first file is written.
    qwen = exports_as_qwen2(cfg, info)
    tensors = hf_state_dict(ckpt["model"], cfg, qwen, dtype)
    dtype = tensors["model.embed_tokens.weight"].dtype
    tok_path = tokenizer_file(info, ckpt, ckpt_path)
    tokenizer_json, tokenizer_config = hf_tokenizer(info, tok_path, cfg.max_seq_len)
    bos_id, eot_id = info.get("bos_id"), info.get("eot_id")

    prepare_dest(dest, overwrite)
    save_file(tensors, os.path.join(dest, "model.safetensors"), metadata={"format": "pt"})  # transformers wants format=pt
    write_json(hf_config(cfg, qwen, bos_id, eot_id, dtype), os.path.join(dest, "config.json"))
    write_json({"bos_token_id": bos_id, "eos_token_id": eot_id}, os.path.join(dest, "generation_config.json"))
    write_json(tokenizer_json, os.path.join(dest, "tokenizer.json"))
    write_json(tokenizer_config, os.path.join(dest, "tokenizer_config.json"))
    if info["kind"] == "sentencepiece":
        shutil.copyfile(tok_path, os.path.join(dest, "tokenizer.model"))  # llama.cpp's converter reads it


# ----------------------------------------------------------------------------- import


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise HFError(f"{path} is not valid JSON ({err})") from None


def read_hf_weights(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a HF checkpoint directory: model.safetensors, pytorch_model.bin, or the
    shards listed by their .index.json."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"), ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = os.path.join(path, index_name)
        if os.path.isfile(index):
            files = sorted(set(read_json(index).get("weight_map", {}).values()))
            break
        if os.path.isfile(os.path.join(path, single)):
            files = [single]
            break
    else:
        raise HFError(f"no weights in {path}: expected model.safetensors, pytorch_model.bin or a sharded .index.json")
    state = {}
    for name in files:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise HFError(f"{file} is listed in the weight index but missing")
        if name.endswith(".safetensors"):
            try:
                from safetensors.torch import load_file
            except ImportError:
                raise HFError("reading .safetensors needs the safetensors package: pip install safetensors") from None
            state.update(load_file(file))
        else:
            try:
                state.update(torch.load(file, map_location="cpu", weights_only=True))
            except Exception as err:
                raise HFError(f"cannot read {file} ({type(err).__name__}: {(str(err).splitlines() or [''])[0]})") from None
    return state


def load_hf_model(path: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A local HF Llama/Qwen2 directory as our ModelConfig and state dict (tensors in the dtype
    they were stored in). Both embed.weight and lm_head.weight are present; when tied they are
    the same tensor. Raises HFError naming any unsupported field or mismatched tensor."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise HFError(f"{path} is not a Hugging Face model directory (no config.json)")
    hf_config = read_json(config_path)
    cfg = model_config_from_hf(hf_config)
    hf_state = read_hf_weights(path)
    if hf_config["model_type"] == "llama" and cfg.qkv_bias:
        for i in range(cfg.n_layer):
            bias = hf_state.pop(f"model.layers.{i}.self_attn.o_proj.bias", None)
            if bias is not None and bias.any():
                refuse("attention_bias", True, f"model.layers.{i}.self_attn.o_proj.bias is non-zero and o_proj has no bias here")
    names = hf_names(cfg)
    if cfg.tie_embeddings:
        del names["lm_head.weight"]  # some tied checkpoints store a copy anyway: ignore it
    known = set(names.values()) | {"lm_head.weight"}
    # Old checkpoints saved RoPE's inverse frequencies as a buffer; they follow from the config.
    unexpected = [k for k in hf_state if k not in known and not k.endswith("rotary_emb.inv_freq")]
    missing = [hf for hf in names.values() if hf not in hf_state]
    if unexpected or missing:
        problems = [f"missing {k}" for k in missing] + [f"unexpected {k}" for k in unexpected]
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise HFError(f"the weights in {path} do not match its config.json: {'; '.join(problems[:3])}{more}")
    state = {ours: hf_state[hf] for ours, hf in names.items()}
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    for name, shape in expected_shapes(cfg).items():
        if state[name].shape != shape:
            raise HFError(f"{names.get(name, name)} in {path} has shape {tuple(state[name].shape)}, config.json implies {tuple(shape)}")
    return cfg, state


def special_token_text(value) -> Optional[str]:
    """tokenizer_config.json writes a special token as a string or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def import_hf_tokenizer(path: str, dest_dir: str) -> dict:
    """Convert the tokenizer of HF model directory `path` into dest_dir and return its record
    in meta.json's "tokenizer" format. A SentencePiece tokenizer.model is copied as is; a
    byte-level BPE tokenizer.json (Qwen2, Llama 3, GPT-2 style) becomes tokenizer.tiktoken:
    token ids are the ranks, the pre-tokenizer's regex is pat_str, added tokens are specials."""
    config = read_json(os.path.join(path, "config.json")) if os.path.isfile(os.path.join(path, "config.json")) else {}
    tok_config_path = os.path.join(path, "tokenizer_config.json")
    tok_config = read_json(tok_config_path) if os.path.isfile(tok_config_path) else {}
    os.makedirs(dest_dir, exist_ok=True)

    spm_path, json_path = os.path.join(path, "tokenizer.model"), os.path.join(path, "tokenizer.json")
    if os.path.isfile(spm_path) and _is_sentencepiece(spm_path):
        # The SentencePiece model is the original; HF's tokenizer.json is derived from it.
        pieces = read_sentencepiece(spm_path)["pieces"]
        ids = {p["piece"]: i for i, p in enumerate(pieces)}
        shutil.copyfile(spm_path, os.path.join(dest_dir, "tokenizer.model"))
        info = {"kind": "sentencepiece", "file": "tokenizer.model", "name": None, "pat_str": None, "special_tokens": {}}
    elif os.path.isfile(json_path):
        ranks, pat_str, special = byte_level_bpe_as_tiktoken(read_json(json_path), json_path)
        write_tiktoken_ranks(ranks, os.path.join(dest_dir, "tokenizer.tiktoken"))
        byte_char = bytes_to_unicode()
        ids = {"".join(byte_char[b] for b in token): rank for token, rank in ranks.items()}
        ids.update(special)
        info = {"kind": "tiktoken", "file": "tokenizer.tiktoken", "name": None, "pat_str": pat_str, "special_tokens": special}
    else:
        raise HFError(f"{path} has no tokenizer.model or tokenizer.json to import")

    def token_id(role: str) -> Optional[int]:
        """The tokenizer's bos/eos: by text from tokenizer_config.json (where null means none,
        as Qwen's bos), else config.json's id."""
        if f"{role}_token" in tok_config:
            text = special_token_text(tok_config[f"{role}_token"])
            if text is not None and text not in ids:
                raise HFError(f"tokenizer_config.json's {role}_token {text!r} is not in the vocabulary")
            return ids.get(text)
        value = config.get(f"{role}_token_id")
        return value[0] if isinstance(value, list) and value else value if isinstance(value, int) else None

    eot_id = token_id("eos")
    if eot_id is None:
        raise HFError(f"{path} names no eos token (tokenizer_config.json eos_token or config.json eos_token_id); "
                      "HomeLLM needs one to separate documents")
    info.update(spec=f"hf:{os.path.abspath(path)}", eot_id=eot_id, bos_id=token_id("bos"))
    return info


def _is_sentencepiece(path: str) -> bool:
    try:
        read_sentencepiece(path)
        return True
    except HFError:
        return False  # e.g. Llama 3's original/tokenizer.model is a tiktoken file


# tokenizers' ByteLevel(use_regex=True) splits with GPT-2's pattern.
GPT2_PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_level_bpe_as_tiktoken(tok: dict, json_path: str) -> tuple[dict[bytes, int], str, dict[str, int]]:
    """(ranks, pat_str, special_tokens) of a byte-level BPE tokenizer.json, refusing anything
    tiktoken cannot reproduce."""
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise HFError(f"{json_path} is not a byte-level BPE tokenizer (model {model.get('type')}); only those, or a "
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
        raise HFError(f"{json_path} has pre_tokenizer {json.dumps(pre)[:200]}, which is not one regex split plus "
                      "ByteLevel; tiktoken cannot reproduce it")
    normalizer = tok.get("normalizer")
    if normalizer and normalizer.get("type") != "NFC":
        raise HFError(f"{json_path} has normalizer {normalizer.get('type')}, which tiktoken cannot reproduce")
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
            raise HFError(f"{json_path} token {text!r} is not byte-level encoded; it is not a byte-level BPE tokenizer") from None
    # tiktoken merges by token rank; HF by merge order. They agree when merges create tokens
    # in id order, as in tokenizers that came from tiktoken (Qwen2, Llama 3) or GPT-2.
    merged_ids = [model["vocab"].get(_merge_text(m)) for m in model.get("merges", [])]
    if any(b is None or a is not None and b < a for a, b in zip([None] + merged_ids, merged_ids)):
        warnings.warn(f"{json_path}'s merge order differs from its token ids; tiktoken may split some words differently")
    return ranks, pat_str, special


def _merge_text(merge) -> str:
    left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
    return left + right


def import_hf(path: str, dest: str, dtype: Optional[torch.dtype] = None, overwrite: bool = False) -> str:
    """Write HF model directory `path` as a step-0 HomeLLM checkpoint dest/ckpt.pt plus its
    tokenizer file. Returns the checkpoint's path."""
    cfg, state = load_hf_model(path)
    if dtype is not None:
        state = {name: tensor.to(dtype) for name, tensor in state.items()}
        if cfg.tie_embeddings:
            state["lm_head.weight"] = state["embed.weight"]  # one tensor again, as in the model
    prepare_dest(dest, overwrite)
    info = import_hf_tokenizer(path, dest)
    ckpt = {"model": state, "model_config": cfg.to_dict(), "train_config": {}, "tokenizer": info, "step": 0, "tokens_seen": 0}
    ckpt_path = os.path.join(dest, "ckpt.pt")
    torch.save(ckpt, ckpt_path)
    return ckpt_path


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Export a HomeLLM checkpoint to a Hugging Face model directory, or import one (--import_from).")
    parser.add_argument("--to", required=True, help="the directory to write: the HF model (export) or the out_dir with ckpt.pt (import)")
    parser.add_argument("--out_dir", default="out", help="export the checkpoint out_dir/ckpt.pt")
    parser.add_argument("--ckpt", default=None, help="export this checkpoint file instead of out_dir/ckpt.pt")
    parser.add_argument("--import_from", default=None, metavar="HF_DIR", help="import this local HF Llama/Qwen2 directory instead of exporting")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="dtype of the written weights (default: as stored)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --to directory")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    dtype = DTYPES[args.dtype] if args.dtype else None
    with warnings.catch_warnings():
        # Caveats (e.g. about the tokenizer) as one plain line each, not Python's file:line form.
        warnings.showwarning = lambda message, *_: print(f"warning: {message}", file=sys.stderr)
        try:
            run(args, dtype)
        except (HFError, TokenizerError, SampleError) as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)


def run(args: argparse.Namespace, dtype: Optional[torch.dtype]) -> None:
    if args.import_from:
        if args.ckpt:
            raise HFError("--ckpt is for export; --import_from reads a HF directory")
        if not os.path.isdir(args.import_from):
            raise HFError(f"{args.import_from} is not a directory; --import_from takes a local HF model directory")
        ckpt_path = import_hf(args.import_from, args.to, dtype, args.overwrite)
        print(f"wrote {ckpt_path}; sample with `python sample.py --out_dir {args.to}` or continue pretraining with --init_from={ckpt_path}")
    else:
        export_hf(find_checkpoint(args.out_dir, args.ckpt), args.to, dtype, args.overwrite)
        print(f"wrote {args.to}; load it with transformers.AutoModelForCausalLM.from_pretrained({args.to!r})")


if __name__ == "__main__":
    main()
