"""Sample text from a trained HomeLLM checkpoint, streamed to the terminal as it is generated.

    python sample.py --start "Привет"                          # latest checkpoint in out/
    python sample.py --ckpt out/ckpt_000500.pt --start FILE:prompt.txt --num_samples 3
    python sample.py --interactive                             # type a line, the model continues
    python sample.py --chat --out_dir out-chat                 # talk to a model fine-tuned on conversations
    python sample.py --chat --start "Привет! Как дела?"        # one reply, for scripts

The checkpoint carries its model config and the tokenizer record of the data it was trained
on, so nothing else needs to be passed. Generated text goes to stdout (as UTF-8, a character
at a time even when its bytes are split over several tokens); notes go to stderr.

Checkpoints are found and loaded by checkpoint.py (weights_only: a .pt from a stranger cannot
run code), --device/--dtype are resolved by hardware.py.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
from typing import Callable, Optional, Sequence

import torch

from checkpoint import CheckpointError, find_checkpoint, load_checkpoint, load_checkpoint_tokenizer, model_from_checkpoint
from hardware import DeviceError, choose_dtype, compile_decode, configure_cpu_threads, resolve_device
from model import Transformer
from system import OneLineParser
from tokenizer import Tokenizer, chat_ids

SEPARATOR = "-" * 40  # printed on its own line between samples
REPLACEMENT = "\ufffd"  # what a decoder makes of bytes that are not (yet) a whole UTF-8 character


class SampleError(RuntimeError):
    """A problem the user can fix (missing or foreign checkpoint); main() prints the message as
    one line and exits 1."""


class UsageError(SampleError):
    """A bad flag value; main() prints it as one line and exits 2, as argparse does."""


# ----------------------------------------------------------------------------- streaming text


class TextStreamer:
    """Turns token ids, fed one at a time, into text chunks whose concatenation is exactly
    tokenizer.decode(context + ids)[len(tokenizer.decode(context)):].

    Each step decodes a short window of ids twice, without and with the new token, and emits
    the difference. Two things make this necessary rather than decoding each token alone:
    a character can be split over tokens (byte-level BPE, SentencePiece byte fallback), and a
    decoder treats the first token of a text specially (SentencePiece drops its leading
    space). A decode ending in U+FFFD is an unfinished character: it is held back until the
    next token completes it, or until end() when the bytes really are invalid.
    """

    def __init__(self, tokenizer, context: Sequence[int] = ()):
        self.decode: Callable[[list[int]], str] = tokenizer.decode
        # A few tokens of context so decode() sees the first new token where it really sits
        # (mid-text, with its leading space). `context` should end on a character boundary,
        # as anything from encode() does.
        self.ids = list(context)[-4:]
        self.start = 0  # the window decoded each step is ids[start:]
        self.done = len(self.ids)  # ids[:done] are already emitted (or were context)
        self.text = ""  # everything emitted so far

    def put(self, token_id: int) -> str:
        """Add one token; return the text it completes (often "", e.g. half a character)."""
        self.ids.append(int(token_id))
        emitted = self.decode(self.ids[self.start : self.done])
        current = self.decode(self.ids[self.start :])
        if current.endswith(REPLACEMENT) or len(current) <= len(emitted):
            return ""
        chunk = current[len(emitted) :]
        # Slide the window: what was just emitted becomes the next step's left context.
        self.start, self.done = self.done, len(self.ids)
        self.text += chunk
        return chunk

    def end(self) -> str:
        """Flush what is held back: after the last token, U+FFFD means truly invalid bytes."""
        emitted = self.decode(self.ids[self.start : self.done])
        chunk = self.decode(self.ids[self.start :])[len(emitted) :]
        self.start = self.done = len(self.ids)
        self.text += chunk
        return chunk


# ----------------------------------------------------------------------------- generation


def read_prompt(start: str) -> str:
    """--start is the text itself, or FILE:path to read it from a UTF-8 file."""
    try:
        start.encode("utf-8")
    except UnicodeEncodeError:  # argv bytes that are not UTF-8 arrive as lone surrogates
        raise UsageError("--start holds bytes that are not UTF-8 (check the terminal's encoding), or use --start FILE:path") from None
    if not start.startswith("FILE:"):
        return start
    path = start[len("FILE:") :]
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        raise UsageError(f"prompt file {path} is not UTF-8 text") from None
    except OSError as err:
        raise UsageError(f"cannot read prompt file {path}: {err.strerror}") from None


def prompt_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    # An empty prompt (or one a normalizing tokenizer encodes to nothing, like " ") starts a
    # fresh document: the end-of-text token is what precedes every document in training.
    return tokenizer.encode(text) or [tokenizer.eot_id]


def context_keep(max_seq_len: int, max_new_tokens: int) -> int:
    """How many of the most recent prompt tokens the model is shown: all that leave room for
    max_new_tokens in the context window, but at least half the window (when max_new_tokens
    alone nearly fills it, generation then stops when the window is full)."""
    return max(max_seq_len - max_new_tokens, max_seq_len // 2, 1)


def fit_context(ids: list[int], max_seq_len: int, max_new_tokens: int) -> list[int]:
    """The most recent tokens of ids that the model is shown (context_keep)."""
    return ids[-context_keep(max_seq_len, max_new_tokens):]


def context_rule(max_seq_len: int, max_new_tokens: int) -> str:
    """Why fit_context kept as many tokens as it did, in words whose arithmetic is true."""
    if context_keep(max_seq_len, max_new_tokens) == max_seq_len - max_new_tokens:
        return f"max_seq_len={max_seq_len} minus max_new_tokens={max_new_tokens}"
    return f"half of max_seq_len={max_seq_len}, since max_new_tokens={max_new_tokens} would leave less"


def stream_sample(
    model: Transformer,
    tokenizer: Tokenizer,
    context: list[int],
    write: Callable[[str], None],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: Optional[int] = 200,
    top_p: Optional[float] = None,
    stop_at_eot: bool = True,
    generator: Optional[torch.Generator] = None,
    cache_len: Optional[int] = None,
    eos_ids: Optional[list[int]] = None,
) -> tuple[list[int], str, str]:
    """Continue `context`, writing text as soon as each character is complete. Returns
    (new token ids, new text, why it stopped: "max_new_tokens" | "eos" | "max_seq_len" |
    "interrupted"). Ctrl-C ends this generation only; the caller decides what follows.
    eos_ids: the tokens that end it, never printed (default: end-of-text, if stop_at_eot)."""
    device = next(model.parameters()).device
    if eos_ids is None:
        eos_ids = [tokenizer.eot_id] if stop_at_eot else []
    idx = torch.tensor([context], dtype=torch.long, device=device)
    stream = model.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, eos_ids[0] if eos_ids else None, generator,
                                   tokenizer.vocab_size, cache_len)
    streamer = TextStreamer(tokenizer, context)
    new_ids: list[int] = []
    reason = "max_new_tokens"
    try:
        while True:
            try:
                token = int(next(stream)[0])
            except StopIteration as stop:
                reason = stop.value or reason
                break
            if token in eos_ids:  # ends the sample; it is not text to print
                reason = "eos"
                break
            new_ids.append(token)
            chunk = streamer.put(token)
            if chunk:
                write(chunk)
    except KeyboardInterrupt:
        reason = "interrupted"
    finally:
        stream.close()  # frees the KV cache even when interrupted
    tail = streamer.end()
    if tail:
        write(tail)
    return new_ids, streamer.text, reason


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = OneLineParser(description="Sample text from a HomeLLM checkpoint, streamed as it is generated.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out_dir", default=None, help="where train.py wrote its checkpoints; None: the run here that saved last")
    p.add_argument("--ckpt", default=None, help="an explicit checkpoint file (overrides --out_dir)")
    p.add_argument("--start", default="", help='prompt text, or FILE:path to read it from a file; empty starts a fresh document')
    p.add_argument("--num_samples", type=int, default=1, help="independent samples, one after another")
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help="tokens to generate per sample / per turn; None: 256, or half the model's context window if that is less")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy; higher is more random")
    p.add_argument("--top_k", type=int, default=200, help="sample among the k most likely tokens (0: no limit)")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling: the smallest set reaching probability p")
    p.add_argument("--seed", type=int, default=None, help="make sampling reproducible; None: different every run")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on a GPU that computes it natively (compute capability 8.0+) or a CPU where a quick probe finds it fast, else float32")
    p.add_argument("--no_stop_at_eot", action="store_true", help="keep going past the end-of-text token instead of stopping there")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (on CUDA as a CUDA graph; on CPU it needs a C++ compiler): pays off for many or long samples")
    p.add_argument("--interactive", action="store_true", help="a REPL: each line you type extends the text; Ctrl-C stops a generation, Ctrl-D exits")
    p.add_argument("--chat", action="store_true", help="talk to a model fine-tuned on conversations: each line you type is a user "
                   "message, the reply streams and ends at <|im_end|>; with --start: answer that one message, print only the reply")
    p.add_argument("--system", default=None, help="--chat: a system message that opens the conversation")
    p.add_argument("--messages", default=None, metavar="FILE",
                   help="--chat: the conversation so far, a JSON list of {\"role\", \"content\"}; the reply continues it (then --start, "
                   "if given, is the next user message), is printed alone, and the program exits")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    if args.num_samples < 1:
        raise UsageError(f"--num_samples={args.num_samples} must be at least 1")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError(f"--max_new_tokens={args.max_new_tokens} must be at least 1")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UsageError(f"--temperature={args.temperature} must be a number >= 0 (0 is greedy)")
    if args.top_k < 0:
        raise UsageError(f"--top_k={args.top_k} must be >= 0 (0 means no limit)")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise UsageError(f"--top_p={args.top_p} must be in (0, 1]")
    if args.seed is not None and not 0 <= args.seed < 2**64:
        raise UsageError(f"--seed={args.seed} must be between 0 and 2**64 - 1")
    if (args.system is not None or args.messages) and not args.chat:
        raise UsageError("--system and --messages belong to --chat")
    if args.chat and (args.interactive or args.num_samples > 1):
        raise UsageError("--chat is a conversation of its own: leave out --interactive and --num_samples")


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def use_utf8(stream) -> None:
    # The model's text is Unicode whatever the terminal's locale says; write (and read) UTF-8.
    if hasattr(stream, "reconfigure"):
        stream.reconfigure(encoding="utf-8", errors="replace")


def read_line() -> str:
    """One line typed by the user, without its newline; EOFError on Ctrl-D / end of input."""
    if sys.stdin.isatty() and sys.stdout.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        return input("> ")
    sys.stderr.write("> ")
    sys.stderr.flush()
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


def run_interactive(model: Transformer, tokenizer: Tokenizer, start_text: str, settings: dict, write) -> None:
    """Each typed line is appended (on a new line) to the text so far, and the model continues
    it; an empty line lets the model simply go on. The whole text is re-encoded each turn, so
    the model sees the tokens it was trained on rather than token-by-token joins."""
    max_seq_len, max_new_tokens = model.config.max_seq_len, settings["max_new_tokens"]
    text = start_text
    cropped_before = False
    note("interactive: type a line and press Enter, the model continues the text; an empty line lets it go on. "
         "Ctrl-C stops a generation, Ctrl-D exits.")
    while True:
        try:
            line = read_line()
        except EOFError:
            note("")
            return
        except KeyboardInterrupt:
            note("")
            continue
        if line:
            text = f"{text}\n{line}" if text else line
        ids = prompt_ids(tokenizer, text)
        context = fit_context(ids, max_seq_len, max_new_tokens)
        if len(context) < len(ids) and not cropped_before:
            note(f"(the text is now longer than the {len(context)} tokens the model is shown, {context_rule(max_seq_len, max_new_tokens)}; "
                 "from here on it sees only the most recent ones)")
            cropped_before = True
        _, new_text, reason = stream_sample(model, tokenizer, context, write, **settings)
        write("\n")
        if reason == "interrupted":
            note("[stopped]")
        text += new_text


# ----------------------------------------------------------------------------- chat


def read_messages(path: str) -> list[dict]:
    """--messages: a JSON list of {"role": "system"|"user"|"assistant", "content": str}."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            messages = json.load(f)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read --messages {path}: {getattr(err, 'strerror', None) or err}") from None
    ok = isinstance(messages, list) and all(
        isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)
        and not any(0xD800 <= ord(c) <= 0xDFFF for c in m["content"]) for m in messages)  # (JSON's "\ud800" is no text)
    if not ok:
        raise UsageError(f"--messages {path} must hold a JSON list of {{\"role\": \"system\"|\"user\"|\"assistant\", \"content\": \"...\"}}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def fit_conversation(tokenizer: Tokenizer, messages: list[dict], keep: int) -> tuple[list[int], int, bool]:
    """The prompt for the next reply, the conversation in the chat template, made to fit in keep
    tokens by dropping the oldest turns (in place; a system message stays). Returns the ids,
    how many messages were dropped and whether the rest still had to lose its first tokens."""
    dropped = 0
    while True:
        ids, _ = chat_ids(tokenizer, messages, add_generation_prompt=True)
        first = 1 if messages and messages[0]["role"] == "system" else 0
        if len(ids) <= keep or len(messages) - first <= 1:
            return ids[-keep:], dropped, len(ids) > keep
        del messages[first]  # the oldest user message, then the reply it had
        dropped += 1
        if first < len(messages) - 1 and messages[first]["role"] == "assistant":
            del messages[first]
            dropped += 1


def chat_reply(model: Transformer, tokenizer: Tokenizer, messages: list[dict], settings: dict, write) -> tuple[str, str]:
    """Stream the assistant's reply to `messages` (the conversation so far); returns (its text,
    why it stopped). It ends at <|im_end|> (or end-of-text); Ctrl-C ends it early."""
    max_seq_len, max_new_tokens = model.config.max_seq_len, settings["max_new_tokens"]
    keep = context_keep(max_seq_len, max_new_tokens)
    context, dropped, cut = fit_conversation(tokenizer, messages, keep)
    if dropped or cut:
        what = [f"dropped its {dropped} oldest message(s)"] * bool(dropped) + ["the model sees only the end of the rest"] * cut
        note(f"(the conversation no longer fits the {keep} tokens the model is shown, {context_rule(max_seq_len, max_new_tokens)}: "
             f"{' and '.join(what)})")
    eos_ids = [tokenizer.im_end_id, tokenizer.eot_id]
    _, text, reason = stream_sample(model, tokenizer, context, write, **{**settings, "eos_ids": eos_ids})
    write("\n")
    return text, reason


def run_chat(model: Transformer, tokenizer: Tokenizer, messages: list[dict], settings: dict, write, once: bool) -> bool:
    """A conversation in the terminal: each line typed is a user message, the reply streams
    and the history is kept. once: reply to `messages` as they are and return. Returns False
    when Ctrl-C cut a reply short in `once` mode."""
    if once:
        return chat_reply(model, tokenizer, messages, settings, write)[1] != "interrupted"
    note("chat: type a message and press Enter. Ctrl-C stops a reply, Ctrl-D ends the chat.")
    while True:
        try:
            line = read_line()
        except EOFError:
            note("")
            return True
        except KeyboardInterrupt:
            note("")
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        text, reason = chat_reply(model, tokenizer, messages, settings, write)
        if reason == "interrupted":
            note("[stopped]")
        messages.append({"role": "assistant", "content": text})


def run_samples(model: Transformer, tokenizer: Tokenizer, prompt_text: str, num_samples: int, settings: dict, write) -> bool:
    """Print num_samples continuations of the prompt. Returns False when Ctrl-C cut it short."""
    max_seq_len, max_new_tokens = model.config.max_seq_len, settings["max_new_tokens"]
    ids = prompt_ids(tokenizer, prompt_text)
    context = fit_context(ids, max_seq_len, max_new_tokens)
    if len(context) < len(ids):
        note(f"(the prompt has {len(ids)} tokens; the model sees the last {len(context)} of them, {context_rule(max_seq_len, max_new_tokens)})")
    # The prompt as the model sees it, so prompt + continuation read as one text.
    shown_prompt = tokenizer.decode(ids) if prompt_text else ""
    for i in range(num_samples):
        if i:
            write(SEPARATOR + "\n")
        write(shown_prompt)
        _, _, reason = stream_sample(model, tokenizer, context, write, **settings)
        write("\n")
        if reason == "interrupted":
            return False
        if reason == "max_seq_len":
            note(f"[stopped early: the context window max_seq_len={max_seq_len} is full]")
    return True


def chat_messages(args: argparse.Namespace, prompt_text: str, tokenizer: Tokenizer, ckpt_data: dict, path: str) -> list[dict]:
    """The conversation --chat starts from: --system, --messages, then --start as a user message."""
    if tokenizer.im_start_id is None:
        raise SampleError(f"{path} has no chat tokens (<|im_start|>, <|im_end|>) in its tokenizer: it is a base model; "
                          "fine-tune it on conversations first (prepare.py on conversation JSONL, then train.py config/sft.py --init_from=...)")
    if ckpt_data.get("chat") is False:
        note(f"note: {path} was trained on plain text, not on conversations; its replies will read like continued text")
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages += read_messages(args.messages) if args.messages else []
    if prompt_text:
        messages.append({"role": "user", "content": prompt_text})
    if (args.start or args.messages) and (not messages or messages[-1]["role"] != "user"):
        raise UsageError("the conversation to reply to must end with a user message")
    return messages


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    use_utf8(sys.stdout)
    use_utf8(sys.stdin)

    def write(chunk: str) -> None:
        sys.stdout.write(chunk)
        sys.stdout.flush()  # stream: each character appears as soon as it is complete

    try:
        check_args(args)
        prompt_text = read_prompt(args.start)  # before loading anything: a typo fails fast
        device = resolve_device(args.device)
        dtype, dtype_why = choose_dtype(args.dtype, device, training=False)
        threads = configure_cpu_threads() if device.type == "cpu" else ""
        path = find_checkpoint(args.out_dir, args.ckpt)
        ckpt = load_checkpoint(path)
        model = model_from_checkpoint(ckpt, device, dtype, name=path)
        tokenizer = load_checkpoint_tokenizer(ckpt, path)
        if tokenizer.vocab_size > model.config.vocab_size:
            raise SampleError(
                f"the tokenizer of {path} has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}; "
                "the tokenizer file next to the checkpoint is not the one it was trained with"
            )
        step, ckpt_data = ckpt.get("step", "?"), ckpt.get("data") or {}
        del ckpt  # the weights now live in the model
        compiled = ""
        if args.compile:
            if device.type == "mps":
                note("--compile is used on CUDA and CPU, not MPS; running without it")
            elif device.type == "cpu" and not shutil.which(os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++")):
                note("--compile on CPU needs a C++ compiler (g++, or $CXX) to build its kernels; running without it")
            else:
                # Decode steps dominate sampling. One compiled graph per KV-cache size bucket
                # serves every step, sample and interactive turn (see hardware.compile_decode).
                compiled = compile_decode(model)  # says how; printed after the model's line below
        generator = torch.Generator(device=device)
        if args.seed is not None:
            generator.manual_seed(args.seed)
        else:
            generator.seed()
        max_new_tokens = args.max_new_tokens or min(256, model.config.max_seq_len // 2)  # always room for a prompt
        settings = dict(max_new_tokens=max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
                        top_p=args.top_p, stop_at_eot=not args.no_stop_at_eot, generator=generator)
        found = " (the run here that saved last; --out_dir picks another)" if args.out_dir is None and args.ckpt is None else ""
        note(f"{path}{found}: step {step}, {model.num_params():,} parameters, {device} {str(dtype).removeprefix('torch.')} "
             f"({dtype_why}){', ' + threads if threads else ''}")
        if compiled:
            note(compiled)
        if args.chat:
            messages = chat_messages(args, prompt_text, tokenizer, ckpt_data, path)
            if not run_chat(model, tokenizer, messages, settings, write, once=bool(args.start or args.messages)):
                sys.exit(130)
        elif args.interactive:
            run_interactive(model, tokenizer, prompt_text, settings, write)
        elif not run_samples(model, tokenizer, prompt_text, args.num_samples, settings, write):
            sys.exit(130)  # Ctrl-C: the usual exit status of an interrupted program
    except (SampleError, CheckpointError, DeviceError) as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)  # one line, even if a library's text had several
        sys.exit(2 if isinstance(err, UsageError) else 1)
    except KeyboardInterrupt:
        note("")
        sys.exit(130)
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, and keep Python's final flush of
        # stdout from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


if __name__ == "__main__":
    main()
