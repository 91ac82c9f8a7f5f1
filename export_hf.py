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
train.py's --init_from hf:DIR reads the directory with hf.load_hf_model() directly.

This file is the command line; the work is hf.py's (and checkpoint.consolidate's for --to FILE.pt).
Only local directories are read; nothing is downloaded. Writing .safetensors files needs the
`safetensors` package (pip install safetensors); nothing else beyond torch.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Optional

import torch

from checkpoint import CheckpointError, consolidate, find_checkpoint
from hardware import DTYPES
from hf import HFError, export_hf, import_hf
from system import OneLineParser
from tokenizer import TokenizerError


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = OneLineParser(description="Export a HomeLLM checkpoint to a Hugging Face model directory, or import one (--import_from).")
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
