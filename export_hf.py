"""Move models between HomeLLM and the Hugging Face format, both ways.

Export a checkpoint so that transformers, vLLM or llama.cpp's convert_hf_to_gguf.py can use it:

    python export_hf.py --out_dir out --to hf_model/            # out/ckpt.pt -> hf_model/
    python export_hf.py --ckpt out/ckpt_002000.pt --to hf_model/ --dtype bfloat16

Or straight to one GGUF file for llama.cpp, Ollama and LM Studio (needs `pip install gguf`; see
gguf_export.py), with an Ollama Modelfile written next to it:

    python export_hf.py --out_dir out --gguf model.gguf --outtype q8_0

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

This file is the command line; the work is hf.py's, gguf_export.py's (--gguf) and
checkpoint.consolidate's (--to FILE.pt).
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
from gguf_export import OUTTYPES, write_gguf
from hardware import DTYPES
from hf import HFError, export_hf, import_hf
from system import OneLineParser
from tokenizer import TokenizerError


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = OneLineParser(description="Export a HomeLLM checkpoint to a Hugging Face model directory, or import one (--import_from).")
    parser.add_argument("--to", default=None, help="what to write: a HF model directory (export), the out_dir for ckpt.pt "
                        "(import), or a FILE.pt: the checkpoint consolidated into one HomeLLM file (weights, no optimizer)")
    parser.add_argument("--gguf", default=None, metavar="FILE.gguf", help="write a GGUF file for llama.cpp, Ollama and LM Studio "
                        "(and an Ollama Modelfile in its directory); instead of or besides --to")
    parser.add_argument("--outtype", choices=OUTTYPES, default=None, help="GGUF weight type (default f16; norms stay f32)")
    parser.add_argument("--out_dir", default=None, help="export the newest checkpoint in out_dir (ckpt.pt or an FSDP run's ckpt_STEP/); "
                        "default: the run in the current directory that saved last")
    parser.add_argument("--ckpt", default=None, help="export this checkpoint (a .pt file or a sharded ckpt_STEP/ directory) instead")
    parser.add_argument("--import_from", default=None, metavar="HF_DIR", help="import this local HF Llama/Qwen2 directory instead of exporting")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="dtype of the written weights (default: as stored)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --to directory, replace an existing --gguf file")
    args = parser.parse_args(argv)
    if not args.to and not args.gguf:
        parser.error("say what to write: --to DIR (Hugging Face), --to FILE.pt, or --gguf FILE.gguf")
    if args.gguf and args.import_from:
        parser.error("--gguf exports a HomeLLM checkpoint; --import_from reads a HF directory")
    if args.outtype and not args.gguf:
        parser.error("--outtype is the weight type of --gguf; --dtype sets that of --to")
    return args


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
        return
    ckpt_path = find_checkpoint(args.out_dir, args.ckpt)
    if args.gguf:  # first: it checks its own destination and tokenizer before writing anything
        modelfile = write_gguf(ckpt_path, args.gguf, args.outtype or "f16", args.overwrite)
        print(f"wrote {args.gguf} and {modelfile}; try `llama-completion -m {args.gguf} -p TEXT` or "
              f"`ollama create NAME -f {modelfile}` (docs/export.md)")
    if not args.to:
        return
    if args.to.endswith(".pt"):
        consolidate(ckpt_path, args.to, dtype, args.overwrite)
        print(f"wrote {args.to}; sample with `python sample.py --ckpt {args.to}` or start a run from it with --init_from={args.to}")
    else:
        export_hf(ckpt_path, args.to, dtype, args.overwrite)
        print(f"wrote {args.to}; load it with transformers.AutoModelForCausalLM.from_pretrained({args.to!r})")


if __name__ == "__main__":
    main()
