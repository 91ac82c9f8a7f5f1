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
train.py's --init_from hf:DIR reads the directory with checkpoint.load_hf_model() directly.

The architectures are the same, so weights map one to one by name (model.py already uses HF's
names and its rotate-half RoPE layout: no q/k permutation). Only local directories are read;
nothing is downloaded. Needs the `safetensors` package for .safetensors files (pip install
safetensors); nothing else beyond torch.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import warnings
from typing import Optional

import torch

from checkpoint import CheckpointError, HFError, atomic_save, checkpoint_tokenizer_path, find_checkpoint, hf_names, load_checkpoint, load_hf_model
from hardware import DTYPES
from model import ModelConfig
from tokenizer import QWEN2_PAT_STR, TokenizerError, hf_tokenizer, import_hf_tokenizer

# Files an export writes, and the weight files a loader might pick up instead of ours; with
# --overwrite exactly these are removed first, so a stale shard cannot shadow the new weights.
HF_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
    "pytorch_model.bin", "pytorch_model.bin.index.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model",
)


# ----------------------------------------------------------------------------- config.json


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



# ----------------------------------------------------------------------------- export


def prepare_dest(dest: str, overwrite: bool) -> None:
    """Refuse to write into a non-empty directory unless asked; then clear only our own files."""
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise HFError(f"--to {dest} is a file, not a directory; choose another --to")
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
    write_json({"bos_token_id": bos_id, "eos_token_id": eot_id}, os.path.join(dest, "generation_config.json"))
    write_json(tokenizer_json, os.path.join(dest, "tokenizer.json"))
    write_json(tokenizer_config, os.path.join(dest, "tokenizer_config.json"))
    if info["kind"] == "sentencepiece":
        shutil.copyfile(tok_path, os.path.join(dest, "tokenizer.model"))  # llama.cpp's converter reads it



def consolidate(ckpt_path: str, dest: str, dtype: Optional[torch.dtype] = None, overwrite: bool = False) -> None:
    """One HomeLLM .pt file from any checkpoint, e.g. an FSDP run's sharded ckpt_STEP/: the full
    weights and the run's records (config, tokenizer, step), without the optimizer state, which
    only resuming needs (and resuming reads the sharded directory itself). The tokenizer file is
    copied next to it, so sample.py --ckpt dest works anywhere."""
    if os.path.exists(dest) and not overwrite:
        raise HFError(f"{dest} exists; pass --overwrite to replace it, or choose another --to")
    ckpt = load_checkpoint(ckpt_path)
    tokenizer_src = checkpoint_tokenizer_path(ckpt, ckpt_path)
    state = {k: v for k, v in ckpt.items() if k not in ("optimizer", "sharded")}
    if dtype is not None:
        state["model"] = {name: tensor.to(dtype) for name, tensor in ckpt["model"].items()}
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    atomic_save(state, dest)
    tokenizer_dest = os.path.join(os.path.dirname(os.path.abspath(dest)), os.path.basename(tokenizer_src))
    if not os.path.exists(tokenizer_dest):
        shutil.copyfile(tokenizer_src, tokenizer_dest)


# ----------------------------------------------------------------------------- import


def import_hf(path: str, dest: str, dtype: Optional[torch.dtype] = None, overwrite: bool = False) -> str:
    """Write HF model directory `path` as a step-0 HomeLLM checkpoint dest/ckpt.pt plus its
    tokenizer file. Returns the checkpoint's path."""
    cfg, state = load_hf_model(path)
    if dtype is not None:
        state = {name: tensor.to(dtype) for name, tensor in state.items()}
        if cfg.tie_embeddings:
            state["lm_head.weight"] = state["embed.weight"]  # one tensor again, as in the model
    created = not os.path.exists(dest)
    prepare_dest(dest, overwrite)
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


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Export a HomeLLM checkpoint to a Hugging Face model directory, or import one (--import_from).")
    parser.add_argument("--to", required=True, help="what to write: a HF model directory (export), the out_dir for ckpt.pt "
                        "(import), or a FILE.pt: the checkpoint consolidated into one HomeLLM file (weights, no optimizer)")
    parser.add_argument("--out_dir", default=None, help="export the newest checkpoint in out_dir (ckpt.pt or an FSDP run's ckpt_STEP/); "
                        "default: the run in the current directory that saved last")
    parser.add_argument("--ckpt", default=None, help="export this checkpoint (a .pt file or a sharded ckpt_STEP/ directory) instead")
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
        except (CheckpointError, TokenizerError) as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)
        except OSError as err:  # permissions, a full disk: the system's words, on one line
            print(f"error: {err.strerror or err}{f': {err.filename}' if err.filename else ''}", file=sys.stderr)
            sys.exit(1)


def run(args: argparse.Namespace, dtype: Optional[torch.dtype]) -> None:
    if args.import_from:
        if args.ckpt:
            raise HFError("--ckpt is for export; --import_from reads a HF directory")
        if not os.path.isdir(args.import_from):
            raise HFError(f"{args.import_from} is not a directory; --import_from takes a local HF model directory")
        ckpt_path = import_hf(args.import_from, args.to, dtype, args.overwrite)
        print(f"wrote {ckpt_path}; sample with `python sample.py --out_dir {args.to}` or continue pretraining with --init_from={ckpt_path}")
    elif args.to.endswith(".pt"):
        consolidate(find_checkpoint(args.out_dir, args.ckpt), args.to, dtype, args.overwrite)
        print(f"wrote {args.to}; sample with `python sample.py --ckpt {args.to}` or start a run from it with --init_from={args.to}")
    else:
        export_hf(find_checkpoint(args.out_dir, args.ckpt), args.to, dtype, args.overwrite)
        print(f"wrote {args.to}; load it with transformers.AutoModelForCausalLM.from_pretrained({args.to!r})")


if __name__ == "__main__":
    main()
