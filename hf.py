"""Hugging Face model directories, both ways: reading one (export_hf.py --import_from, train.py
--init_from hf:DIR) and writing one (export_hf.py's export).

    cfg, state = load_hf_model("~/models/Qwen2.5-0.5B")   # our ModelConfig and state dict
    export_hf("out/ckpt.pt", "hf_model/")                  # config.json, model.safetensors, tokenizer
    import_hf("~/models/Qwen2.5-0.5B", "out-qwen")         # a step-0 HomeLLM checkpoint

model.py uses HF's parameter names and its rotate-half RoPE layout, so weights map one to one
by name (hf_names), with no q/k permutation; reading a directory is renaming plus refusing
every config.json feature model.py does not implement. Only local directories are read, nothing
is downloaded. Reading needs nothing beyond torch and numpy (.safetensors files are memory-mapped
by read_safetensors); writing needs the `safetensors` package. The tokenizer conversions both
ways: hf_tokenizer here (our tokenizer's files), import_hf_tokenizer in tokenizer.py.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from typing import Callable, NoReturn, Optional

import torch

from checkpoint import CheckpointError, atomic_save, checkpoint_tokenizer_path, expected_shapes, load_checkpoint
from model import ModelConfig
from tokenizer import (CHATML_TEMPLATE, IM_END, QWEN2_PAT_STR, SP_UNKNOWN, TokenizerError, bytes_to_unicode, import_hf_tokenizer,
                       read_sentencepiece, read_tiktoken_ranks, sentencepiece_tokenizer_json, tiktoken_tokenizer_json)


class HFError(CheckpointError):
    """A Hugging Face model directory HomeLLM cannot read or write (bad path, unsupported model)."""


# ----------------------------------------------------------------------------- reading

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
        quant = hf["quantization_config"]
        refuse("quantization_config", quant.get("quant_method", "?") if isinstance(quant, dict) else quant, "only unquantized weights can be imported")
    # RoPE: the old keys (rope_theta + rope_scaling) or transformers 5's rope_parameters.
    rope_theta = hf.get("rope_theta", 10000.0)
    for field in ("rope_scaling", "rope_parameters"):
        rope = hf.get(field)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            refuse(field, rope, "it must be an object such as {\"rope_type\": \"default\"}")
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            refuse(field, rope, "only plain RoPE is implemented, no scaling")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            refuse(field, rope, "RoPE rotates the whole head")
        rope_theta = rope.get("rope_theta", rope_theta)
    for field, value in (("rope_theta", rope_theta), ("rms_norm_eps", hf.get("rms_norm_eps", 1e-6)), ("initializer_range", hf.get("initializer_range", 0.02))):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise HFError(f"config.json has {field}={json.dumps(value)}, which is not a number")
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


def read_json(path: str) -> dict:
    """A JSON object from a HF directory, or an HFError that names the file."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HFError(f"{path} is not valid UTF-8 JSON ({err})") from None
    if not isinstance(value, dict):
        raise HFError(f"{path} holds a JSON {type(value).__name__}, not an object; it is not a Hugging Face config file")
    return value


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file, memory-mapped: nothing is read until used, and
    processes on one machine share the pages, so ranks that each take their slice of every
    tensor read the file once between them. (The format: an 8-byte little-endian header size,
    a JSON header {name: {dtype, shape, data_offsets}}, then the raw little-endian data.)"""
    import numpy as np

    try:
        with open(path, "rb") as f:
            header_size = struct.unpack("<Q", f.read(8))[0]
            if header_size > os.path.getsize(path) - 8:  # read blindly, a forged size asks for terabytes
                raise ValueError(f"the header claims {header_size:,} bytes of a {os.path.getsize(path):,}-byte file")
            header = json.loads(f.read(header_size))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        data = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: writable for torch, never written back
        start = 8 + header_size
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype, shape, (begin, end) = SAFETENSORS_DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
            numel = math.prod(shape)
            if end - begin != numel * dtype.itemsize or start + end > len(data):
                raise ValueError(f"{name} claims {numel * dtype.itemsize} bytes at {begin}..{end} of a {len(data)}-byte file")
            flat = torch.frombuffer(data, dtype=dtype, count=numel, offset=start + begin) if numel else torch.empty(0, dtype=dtype)
            tensors[name] = flat.view(shape)
    except (OSError, ValueError, KeyError, TypeError, struct.error, OverflowError) as err:
        raise HFError(f"cannot read {path}: it is not a valid .safetensors file ({type(err).__name__}: {err})") from None
    return tensors


def read_hf_weights(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a HF checkpoint directory: model.safetensors, pytorch_model.bin, or the
    shards listed by their .index.json."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"), ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = os.path.join(path, index_name)
        if os.path.isfile(index):
            weight_map = read_json(index).get("weight_map", {})
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) and f and os.path.basename(f) == f for f in weight_map.values()):
                raise HFError(f"{index} has no weight_map from tensor names to file names in its directory; it is not a Hugging Face weight index")
            files = sorted(set(weight_map.values()))
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
            state.update(read_safetensors(file))
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
    try:
        cfg = model_config_from_hf(hf_config)
    except (TypeError, AttributeError) as err:  # a field of an unexpected JSON type, e.g. a list for a number
        raise HFError(f"{config_path} is malformed: a field has the wrong JSON type ({err})") from None
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


# ----------------------------------------------------------------------------- writing

# Files an export writes, and the weight files a loader might pick up instead of ours; with
# --overwrite exactly these are removed first, so a stale shard cannot shadow the new weights.
HF_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
    "pytorch_model.bin", "pytorch_model.bin.index.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model",
)


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


IMPORT_FILES = ("ckpt.pt", "tokenizer.model", "tokenizer.tiktoken")  # what an import writes


def is_export_file(name: str) -> bool:
    return name in HF_FILES or (name.startswith(("model-", "pytorch_model-")) and name.endswith((".safetensors", ".bin")))


def prepare_dest(dest: str, overwrite: bool, ours: Callable[[str], bool] = is_export_file) -> None:
    """Refuse to write into a non-empty directory unless asked. Asked, still refuse a training
    run, a prepared dataset, or any directory holding files this writer does not write (ours
    says which): their config.json or tokenizer file share our names, and replacing them would
    break the run or dataset. Then clear only our own files."""
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise HFError(f"--to {dest} is a file, not a directory; choose another --to")
    names = sorted(os.listdir(dest)) if os.path.isdir(dest) else []
    if names and not overwrite:
        raise HFError(f"{dest} is not empty; pass --overwrite to replace its files, or choose another --to")
    foreign = [name for name in names if not ours(name)]
    if foreign:
        run = {"train.lock", "metrics.jsonl", "status.json"} & set(names) or any(re.fullmatch(r"ckpt_\d+(\.pt)?", n) for n in names)
        kind = "a training run" if run else "a prepared dataset" if "meta.json" in names else "a directory holding files this command did not write"
        raise HFError(f"{dest} is {kind} ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}), so --overwrite will not "
                      "write into it; choose another --to")
    for name in names:
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


def hf_tokenizer(info: dict, path: str, max_seq_len: int) -> tuple[dict, dict]:
    """(tokenizer.json, tokenizer_config.json) for our tokenizer record `info` and its file.
    eos is our eot token; bos only if the tokenizer has one; nothing is added when encoding;
    a tokenizer with chat tokens gets the ChatML chat_template."""
    eot_id, bos_id = info.get("eot_id"), info.get("bos_id")
    if info.get("kind") == "sentencepiece":
        sp = read_sentencepiece(path)
        tokenizer = sentencepiece_tokenizer_json(sp)
        id_to_text = {i: p["piece"] for i, p in enumerate(sp["pieces"])}
        unk = next((p["piece"] for p in sp["pieces"] if p["type"] == SP_UNKNOWN), None)
    elif info.get("kind") == "tiktoken":
        if not info.get("pat_str"):
            raise TokenizerError("the checkpoint's tiktoken tokenizer record has no pat_str")
        ranks = read_tiktoken_ranks(path)
        special = info.get("special_tokens") or {}
        tokenizer = tiktoken_tokenizer_json(ranks, info["pat_str"], special)
        byte_char = bytes_to_unicode()
        id_to_text = {rank: "".join(byte_char[b] for b in token) for token, rank in ranks.items()}
        id_to_text.update({i: s for s, i in special.items()})
        unk = None
    else:
        raise TokenizerError(f"unknown tokenizer kind {info.get('kind')!r} in the checkpoint")
    for role, token_id in (("eot_id", eot_id), ("bos_id", bos_id)):
        if token_id is not None and token_id not in id_to_text:
            raise TokenizerError(f"the tokenizer's {role}={token_id} is not a token of {path}")
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
    if info["kind"] == "sentencepiece":
        # Whether SentencePiece puts a space before the text (its dummy prefix; never with sp:N).
        # llama.cpp's converter reads it from here, and assumes true when it is missing.
        config["add_prefix_space"] = sp["add_dummy_prefix"]
    if info.get("chat_tokens"):  # apply_chat_template then renders what chat_ids encodes
        config["chat_template"] = CHATML_TEMPLATE
    return tokenizer, config


def export_hf(ckpt_path: str, dest: str, dtype: Optional[torch.dtype] = None, overwrite: bool = False) -> None:
    """Write checkpoint `ckpt_path` as a Hugging Face model directory `dest`. dtype: the saved
    weights' dtype (None: the checkpoint's own, float32 for train.py's)."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise HFError("writing .safetensors needs the safetensors package: pip install safetensors") from None
    ckpt = load_checkpoint(ckpt_path)  # weights_only, clear errors
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
    tok_path = checkpoint_tokenizer_path(ckpt, ckpt_path)
    tokenizer_json, tokenizer_config = hf_tokenizer(info, tok_path, cfg.max_seq_len)
    bos_id, eot_id = info.get("bos_id"), info.get("eot_id")

    prepare_dest(dest, overwrite)
    save_file(tensors, os.path.join(dest, "model.safetensors"), metadata={"format": "pt"})  # transformers wants format=pt
    write_json(hf_config(cfg, qwen, bos_id, eot_id, dtype), os.path.join(dest, "config.json"))
    # A chat model's turn ends at <|im_end|>: generate() stops there (or at end-of-text), as sample.py --chat does.
    eos_ids = [info["chat_tokens"][IM_END], eot_id] if info.get("chat_tokens") else eot_id
    write_json({"bos_token_id": bos_id, "eos_token_id": eos_ids}, os.path.join(dest, "generation_config.json"))
    write_json(tokenizer_json, os.path.join(dest, "tokenizer.json"))
    write_json(tokenizer_config, os.path.join(dest, "tokenizer_config.json"))
    if info["kind"] == "sentencepiece":
        shutil.copyfile(tok_path, os.path.join(dest, "tokenizer.model"))  # llama.cpp's converter reads it


def import_hf(path: str, dest: str, dtype: Optional[torch.dtype] = None, overwrite: bool = False) -> str:
    """Write HF model directory `path` as a step-0 HomeLLM checkpoint dest/ckpt.pt plus its
    tokenizer file. Returns the checkpoint's path."""
    cfg, state = load_hf_model(path)
    if dtype is not None:
        state = {name: tensor.to(dtype) for name, tensor in state.items()}
        if cfg.tie_embeddings:
            state["lm_head.weight"] = state["embed.weight"]  # one tensor again, as in the model
    created = not os.path.exists(dest)
    prepare_dest(dest, overwrite, lambda name: name in IMPORT_FILES)
    ckpt_path = os.path.join(dest, "ckpt.pt")
    try:
        info = import_hf_tokenizer(path, dest)
        ckpt = {"model": state, "model_config": cfg.to_dict(), "train_config": {}, "tokenizer": info, "step": 0, "tokens_seen": 0}
        atomic_save(ckpt, ckpt_path)
    except BaseException:
        if created:  # a failed import leaves nothing behind (only a directory this call made)
            shutil.rmtree(dest, ignore_errors=True)
        raise
    return ckpt_path
