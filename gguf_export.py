"""GGUF files, the format llama.cpp, Ollama and LM Studio run, written straight from a checkpoint.

    write_gguf("out/ckpt.pt", "model.gguf", outtype="q8_0")   # model.gguf, and a Modelfile beside it

No llama.cpp checkout, converter or transformers is involved: the `gguf` package (pip install
gguf) writes the file. What llama.cpp needs to compute exactly what model.py computes:
- architecture `llama` (RoPE on adjacent pairs, so q/k rows are reordered per head, see
  interleave_rope_halves), or `qwen2` for models with q/k/v biases (RoPE on halves, as ours);
- the tokenizer itself, not a description of it: SentencePiece pieces with their scores and
  types (llama.cpp's "llama" tokenizer, no space prefix), or tiktoken ranks as byte-level tokens
  plus the equivalent merge list (its "gpt2" tokenizer) and the name of the pre-tokenizer that
  llama.cpp implements with the same regex (LLAMA_CPP_PRE_TOKENIZERS). Every special token keeps
  its id; unassigned ids and padding rows become unused [PADn] tokens;
- add_bos/add_eos false: HomeLLM frames nothing, documents are separated by eot in the data.
Sharded (FSDP) checkpoints are read on the CPU by checkpoint.load_checkpoint, like every export.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import torch

from checkpoint import CheckpointError, checkpoint_tokenizer_path, expected_shapes, load_checkpoint
from model import ModelConfig
from tokenizer import (DEFAULT_TIKTOKEN_PATTERN, GPT2_PAT_STR, QWEN2_PAT_STR, SP_UNKNOWN, SP_UNUSED,
                       TokenizerError, byte_level_merges, bytes_to_unicode, read_sentencepiece, read_tiktoken_ranks)

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# A tiktoken regex (as tiktoken or a tokenizer.json spells it) -> the llama.cpp pre-tokenizer that
# splits text with the same regex. Only exact spellings are trusted; llama.cpp's o200k-like
# "gpt-4o" drops the combining marks (\p{M}) of o200k's regex, so o200k is not here.
LLAMA_CPP_PRE_TOKENIZERS = {
    DEFAULT_TIKTOKEN_PATTERN: "llama-bpe",  # cl100k_base as tiktoken writes it (prepare.py's default)
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""":
        "llama-bpe",  # the same regex as Llama 3's tokenizer.json writes it
    QWEN2_PAT_STR: "qwen2",
    GPT2_PAT_STR: "gpt-2",
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""": "gpt-2",  # tiktoken's gpt2, r50k, p50k
}
# Our parameter names -> llama.cpp's, inside a layer (blk.N.*) and outside.
GGUF_LAYER_NAMES = {
    "attn_norm": "attn_norm", "attn.q_proj": "attn_q", "attn.k_proj": "attn_k", "attn.v_proj": "attn_v",
    "attn.o_proj": "attn_output", "mlp_norm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
GGUF_NAMES = {"embed.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}


class GGUFError(CheckpointError):
    """A checkpoint that cannot be written as a GGUF llama.cpp would run exactly as HomeLLM does."""


def import_gguf():
    try:
        import gguf
    except ImportError:
        raise GGUFError("writing GGUF needs the gguf package: pip install gguf") from None
    return gguf


# ----------------------------------------------------------------------------- tokenizer


@dataclass
class GGUFVocab:
    """The tokenizer as llama.cpp reads it: one entry per embedding row."""

    model: str  # "llama" (SentencePiece) | "gpt2" (byte-level BPE)
    tokens: list[str]
    types: list[int]  # gguf.TokenType values
    scores: list[float] = field(default_factory=list)  # SentencePiece only
    merges: list[str] = field(default_factory=list)  # BPE only: "left right", in merge order
    pre: Optional[str] = None  # BPE only: llama.cpp's pre-tokenizer name
    unk_id: Optional[int] = None
    add_space_prefix: Optional[bool] = None  # SentencePiece only


def pad_token(token_id: int) -> str:
    return f"[PAD{token_id}]"


def sentencepiece_vocab(path: str, n_rows: int) -> GGUFVocab:
    """SentencePiece pieces, scores and types for llama.cpp's "llama" tokenizer, which merges
    characters into pieces by score (SentencePiece's BPE) and falls back to <0xNN> byte pieces.
    It does no normalization, so models that normalize are refused rather than exported to
    tokenize differently. SentencePiece's piece types are GGUF's token types, number for number
    (normal 1, unknown 2, control 3, user-defined 4, unused 5, byte 6)."""
    sp = read_sentencepiece(path)
    problems = []
    if sp["model_type"] != "bpe":
        problems.append(f"it is a {sp['model_type']} model and llama.cpp segments SentencePiece text with BPE merges")
    if not sp["byte_fallback"]:
        problems.append("it has no byte fallback, which llama.cpp needs for characters outside the vocabulary")
    if sp["charsmap"] or sp["remove_extra_whitespaces"] or not sp["escape_whitespaces"] or sp["treat_whitespace_as_suffix"]:
        problems.append("it normalizes text (a character map, collapsed or unescaped spaces), which llama.cpp does not")
    if problems:
        raise GGUFError(f"llama.cpp would tokenize with {path} differently from HomeLLM: {'; '.join(problems)}. "
                        "Tokenizers that prepare.py trains (sp:N) export exactly")
    pieces = sp["pieces"]
    if len(pieces) > n_rows:
        raise GGUFError(f"the tokenizer has {len(pieces)} pieces but the model only {n_rows} embedding rows")
    pads = range(len(pieces), n_rows)
    return GGUFVocab(
        model="llama",
        tokens=[p["piece"] for p in pieces] + [pad_token(i) for i in pads],
        types=[p["type"] for p in pieces] + [SP_UNUSED] * len(pads),
        scores=[p["score"] for p in pieces] + [0.0] * len(pads),
        unk_id=next((i for i, p in enumerate(pieces) if p["type"] == SP_UNKNOWN), None),
        # SentencePiece's "dummy prefix", a space before the text (never with sp:N); llama.cpp
        # assumes one when the key is missing and would put a space before every prompt.
        add_space_prefix=sp["add_dummy_prefix"],
    )


def bpe_vocab(info: dict, path: str, n_rows: int) -> GGUFVocab:
    """A tiktoken encoding as llama.cpp's "gpt2" tokenizer: token i is rank i in GPT-2's
    byte-to-character spelling, special tokens are control tokens at their own ids, and the
    merge list reproduces tiktoken's rank-ordered merging (byte_level_merges)."""
    gguf = import_gguf()
    pre = LLAMA_CPP_PRE_TOKENIZERS.get(info.get("pat_str"))
    if pre is None:
        raise GGUFError(f"llama.cpp has no pre-tokenizer that splits text with this tokenizer's regex {info.get('pat_str')!r}, "
                        "so it would tokenize differently; GGUF export supports cl100k's, Qwen2's and GPT-2's regex")
    ranks = read_tiktoken_ranks(path)
    special = info.get("special_tokens") or {}
    byte_char = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(byte_char[b] for b in token)

    largest = max([*ranks.values(), *special.values()])
    if largest >= n_rows:
        raise GGUFError(f"the tokenizer has token id {largest} but the model only {n_rows} embedding rows")
    tokens = [pad_token(i) for i in range(n_rows)]  # ids no token has (cl100k has gaps) and padding rows
    types = [int(gguf.TokenType.UNUSED)] * n_rows
    for token, rank in ranks.items():
        tokens[rank], types[rank] = text(token), int(gguf.TokenType.NORMAL)
    for content, token_id in special.items():
        tokens[token_id], types[token_id] = content, int(gguf.TokenType.CONTROL)
    merges = [f"{text(left)} {text(right)}" for left, right in byte_level_merges(ranks)]
    return GGUFVocab(model="gpt2", tokens=tokens, types=types, merges=merges, pre=pre)


def gguf_vocab(info: dict, path: str, n_rows: int) -> GGUFVocab:
    if info.get("kind") == "sentencepiece":
        vocab = sentencepiece_vocab(path, n_rows)
    elif info.get("kind") == "tiktoken":
        vocab = bpe_vocab(info, path, n_rows)
    else:
        raise TokenizerError(f"unknown tokenizer kind {info.get('kind')!r} in the checkpoint")
    if len(set(vocab.tokens)) != len(vocab.tokens):  # llama.cpp looks tokens up by text
        seen: set[str] = set()
        duplicate = next(t for t in vocab.tokens if t in seen or seen.add(t))
        raise GGUFError(f"the token {duplicate!r} appears twice in the vocabulary; llama.cpp needs every token text once")
    for role in ("eot_id", "bos_id"):
        token_id = info.get(role)
        if token_id is not None and not (0 <= token_id < len(vocab.tokens) and vocab.types[token_id] != SP_UNUSED):
            raise TokenizerError(f"the tokenizer's {role}={token_id} is not a token of {path}")
    return vocab


# ----------------------------------------------------------------------------- weights


def gguf_name(ours: str) -> str:
    if ours in GGUF_NAMES:
        return GGUF_NAMES[ours]
    _, layer, rest = ours.split(".", 2)  # layers.N.attn.q_proj.weight
    part, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{GGUF_LAYER_NAMES[part]}.{kind}"


def interleave_rope_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q or k projection (weight or bias) reordered per head for llama.cpp's `llama`
    architecture. model.py (like HF) rotates dimension pairs (i, i + head_dim/2); llama.cpp's
    llama rotates adjacent pairs (2i, 2i+1). Putting our row i at 2i and row i + head_dim/2 at
    2i+1 makes its rotation ours; q.k is unchanged because q and k are reordered alike."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig, arch: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(llama.cpp name, tensor) for every weight, in model order; lm_head is left out when tied
    (llama.cpp then uses token_embd for the output too)."""
    for ours in expected_shapes(cfg):
        if ours == "lm_head.weight" and cfg.tie_embeddings:
            continue
        tensor = state[ours]
        if arch == "llama" and ".q_proj." in ours:
            tensor = interleave_rope_halves(tensor, cfg.n_head)
        elif arch == "llama" and ".k_proj." in ours:
            tensor = interleave_rope_halves(tensor, cfg.n_kv_head)
        yield gguf_name(ours), tensor


def tensor_type(shape: torch.Size, outtype: str):
    """The GGML type a tensor is stored in: norms and biases (1-D) always in f32, as llama.cpp's
    converter does; q8_0 blocks span 32 values of a row, so narrower rows stay f16."""
    gguf = import_gguf()
    types = gguf.GGMLQuantizationType
    if len(shape) == 1 or outtype == "f32":
        return types.F32
    if outtype == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[types.Q8_0][0]:
        return types.F16
    return {"f16": types.F16, "bf16": types.BF16, "q8_0": types.Q8_0}[outtype]


def encode_tensor(tensor: torch.Tensor, qtype):
    """The tensor's bytes in GGML type qtype, as a numpy array."""
    gguf = import_gguf()
    types = gguf.GGMLQuantizationType
    tensor = tensor.detach()
    if qtype == types.F32:
        return tensor.float().contiguous().numpy()
    if qtype == types.F16:
        return tensor.to(torch.float16).contiguous().numpy()
    if qtype == types.BF16:  # numpy has no bfloat16: its bits as int16
        return tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    return gguf.quants.quantize(tensor.float().contiguous().numpy(), qtype)


# ----------------------------------------------------------------------------- the file


def add_model_metadata(writer, cfg: ModelConfig, name: str, outtype: str) -> None:
    """The architecture's hyperparameters, under the architecture's prefix (llama.*, qwen2.*)."""
    gguf = import_gguf()
    file_types = gguf.LlamaFileType
    writer.add_name(name)
    writer.add_file_type({"f32": file_types.ALL_F32, "f16": file_types.MOSTLY_F16, "bf16": file_types.MOSTLY_BF16,
                          "q8_0": file_types.MOSTLY_Q8_0}[outtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.ffn_hidden)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_kv_head)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)


def add_tokenizer_metadata(writer, vocab: GGUFVocab, info: dict) -> None:
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    eot_id = info["eot_id"]
    writer.add_eos_token_id(eot_id)
    # GGUF cannot say "no BOS": without the key llama.cpp picks id 1 or 11, an arbitrary token.
    # The end-of-text token stands in (GPT-2's convention); add_bos_token=false never adds it.
    writer.add_bos_token_id(info["bos_id"] if info.get("bos_id") is not None else eot_id)
    if vocab.unk_id is not None:
        writer.add_unk_token_id(vocab.unk_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)


def write_gguf(ckpt_path: str, dest: str, outtype: str = "f16", overwrite: bool = False) -> str:
    """Write checkpoint `ckpt_path` as the GGUF file `dest` with 2-D weights in `outtype`
    (f32, f16, bf16 or q8_0), and an Ollama Modelfile next to it. Returns the Modelfile's path.
    Everything is checked before the first byte is written; the file appears complete or not
    at all (written under a temporary name, then renamed)."""
    gguf = import_gguf()
    if outtype not in OUTTYPES:
        raise GGUFError(f"--outtype {outtype} is not one of {', '.join(OUTTYPES)}")
    modelfile = os.path.join(os.path.dirname(os.path.abspath(dest)), "Modelfile")
    for path in (dest, modelfile):
        if os.path.isdir(path):
            raise GGUFError(f"{path} is a directory; --gguf takes a file name such as model.gguf")
        if os.path.exists(path) and not overwrite:
            raise GGUFError(f"{path} exists; pass --overwrite to replace it, or choose another --gguf path")
    ckpt = load_checkpoint(ckpt_path)
    try:
        cfg = ModelConfig.from_dict(ckpt["model_config"])
    except (TypeError, ValueError) as err:
        raise GGUFError(f"{ckpt_path} has an invalid model_config: {err}") from None
    state = ckpt["model"]
    for ours, shape in expected_shapes(cfg).items():
        if ours not in state or state[ours].shape != shape:
            raise GGUFError(f"the checkpoint's {ours} is missing or not of shape {tuple(shape)}; it does not match its model_config")
    info = ckpt.get("tokenizer")
    if not isinstance(info, dict):
        raise GGUFError(f"{ckpt_path} records no tokenizer; it was not written by train.py")
    vocab = gguf_vocab(info, checkpoint_tokenizer_path(ckpt, ckpt_path), cfg.vocab_size)
    arch = "qwen2" if cfg.qkv_bias else "llama"  # llama.cpp's qwen2 is llama with q/k/v biases and RoPE on halves
    name = os.path.basename(os.path.dirname(os.path.abspath(ckpt_path)))

    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    tmp = dest + ".tmp"
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        add_model_metadata(writer, cfg, name, outtype)
        add_tokenizer_metadata(writer, vocab, info)
        for gguf_tensor_name, tensor in gguf_tensors(state, cfg, arch):
            qtype = tensor_type(tensor.shape, outtype)
            block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
            nbytes = tensor.numel() // block_size * type_size
            writer.add_tensor_info(gguf_tensor_name, tuple(tensor.shape), np.dtype(np.float32), nbytes, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, tensor in gguf_tensors(state, cfg, arch):  # one tensor in memory at a time
            writer.write_tensor_data(encode_tensor(tensor, tensor_type(tensor.shape, outtype)))
        writer.close()
        os.replace(tmp, dest)
    except BaseException:
        writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    with open(modelfile, "w", encoding="utf-8") as f:
        f.write(ollama_modelfile(os.path.basename(dest), cfg, info))
    return modelfile


def ollama_modelfile(gguf_name: str, cfg: ModelConfig, info: dict) -> str:
    """An Ollama Modelfile for the GGUF: `ollama create NAME -f Modelfile`. The prompt goes in as
    it is (a base model continues text), the context is the one the model was trained for (a
    longer one would put positions it has never seen into RoPE), and sampling is sample.py's."""
    return (
        "# Ollama: `ollama create NAME -f Modelfile`, then `ollama run NAME`\n"
        f"FROM ./{gguf_name}\n"
        'TEMPLATE """{{ .Prompt }}"""\n'
        f"PARAMETER num_ctx {cfg.max_seq_len}\n"
        "PARAMETER temperature 0.8\n"
        "PARAMETER top_k 200\n"
        "PARAMETER top_p 1\n"
        "PARAMETER repeat_penalty 1\n"
    )
