"""sample.py: checkpoint loading, UTF-8-correct streaming, the CLI and its error messages.

Everything is built here: a SentencePiece BPE (byte fallback, dummy prefix) trained on a few
KB of Cyrillic + Latin, a byte-level tiktoken encoding in which a Cyrillic letter is two
tokens, and tiny models saved in train.py's checkpoint format. The "rigged" model samples
only valid UTF-8 but prefers tokens that stop in the middle of a character, so every run
really exercises split characters (see rigged_model).
"""

import base64
import io
import math
import os
import re
import shlex
import subprocess
import sys

import pytest
import sentencepiece as spm
import torch

import checkpoint
import sample
from conftest import stream_decode, token_bytes
from model import ModelConfig, Transformer
from tokenizer import load_tokenizer

torch.set_num_threads(2)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPLACEMENT = "\ufffd"
CORPUS = [
    "Привет, мир! Как дела? Hello world, how are you today?",
    "Жили-были дед да баба, и была у них курочка Ряба.",
    "The quick brown fox jumps over the lazy dog.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "Москва, Санкт-Петербург и Новосибирск - большие города России.",
] * 40
TIKTOKEN_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = "<|endoftext|>"


# ----------------------------------------------------------------------------- tokenizers


def write_sentencepiece(directory) -> dict:
    """A real SentencePiece BPE with byte fallback and SentencePiece's default dummy prefix
    (decode drops the leading space of a text's first piece): the harder case for streaming."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, model_type="bpe", vocab_size=400,
        byte_fallback=True, character_coverage=1.0, hard_vocab_limit=False, minloglevel=2,
        unk_id=0, eos_id=1, bos_id=-1, pad_id=-1,
    )
    with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    return dict(kind="sentencepiece", spec="sp:400", file="tokenizer.model", name=None, pat_str=None,
                special_tokens={}, eot_id=1, bos_id=None)


def write_tiktoken(directory) -> dict:
    """Byte-level BPE: 256 byte tokens and a few merges, among them whole Cyrillic letters and
    one that straddles two letters (end of "и" + start of the next)."""
    ranks = {bytes([i]): i for i in range(256)}
    # Lower rank merges first, so "Привет" becomes Пр, <D0>, <B8 D0>, <B2>, ет: split letters
    # even in the prompt.
    for merge in ["th", "he", " t", "П", "р", "Пр", "е", "т", "ет", b"\xb8\xd0", "и", "в"]:
        ranks[merge.encode() if isinstance(merge, str) else merge] = len(ranks)
    with open(os.path.join(directory, "tokenizer.tiktoken"), "wb") as f:
        for token, rank in ranks.items():
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
    eot = len(ranks)
    return dict(kind="tiktoken", spec="tokenizer.tiktoken", file="tokenizer.tiktoken", name="test-bytes",
                pat_str=TIKTOKEN_PATTERN, special_tokens={EOT: eot}, eot_id=eot, bos_id=None)


WRITERS = {"sentencepiece": write_sentencepiece, "tiktoken": write_tiktoken}


# ----------------------------------------------------------------------------- models and checkpoints


def utf8_state(data: bytes, state: int):
    """A small UTF-8 automaton over printable ASCII and two-byte Cyrillic (lead byte D0/D1):
    state = continuation bytes still due. None when `data` cannot follow `state`."""
    if not data:
        return None  # control / special tokens
    for b in data:
        if state:
            if not 0x80 <= b <= 0xBF:
                return None
            state = 0
        elif b in (0xD0, 0xD1):
            state = 1
        elif not 0x20 <= b <= 0x7E:
            return None
    return state


def rigged_model(tok, n_embd: int = 16, max_seq_len: int = 128) -> Transformer:
    """A model whose next-token distribution depends only on the UTF-8 state after the last
    token: zero output projections make every block the identity, so the final hidden state is
    the last token's embedding, which we set to a one-hot of that state. lm_head then allows
    exactly the tokens that keep the text valid UTF-8 (no newline, no end-of-text) and boosts
    those that end mid-character."""
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=n_embd,
                      max_seq_len=max_seq_len, tie_embeddings=False)
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for block in model.layers:
            block.attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        model.embed.weight.zero_()
        model.lm_head.weight.zero_()
        for t in range(tok.vocab_size):
            after = {s: utf8_state(token_bytes(tok, t), s) for s in (0, 1)}
            valid = [s for s in (0, 1) if after[s] is not None]
            model.embed.weight[t, after[valid[0]] if valid else 0] = 1.0
            for s in (0, 1):
                logit = -30.0 if after[s] is None else 4.0 if after[s] == 1 else 0.0
                # RMSNorm turns the one-hot into sqrt(n_embd) * one-hot; undo that scale.
                model.lm_head.weight[t, s] = logit / math.sqrt(n_embd)
    return model


def random_model(vocab_size: int, **overrides) -> Transformer:
    values = dict(vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=16, max_seq_len=128)
    values.update(overrides)
    torch.manual_seed(0)
    return Transformer(ModelConfig(**values))


def save_checkpoint(path, model: Transformer, info: dict, data_dir: str = "/nonexistent/data", model_config=None) -> str:
    """train.py's format: prefix-free state dict (both embed and lm_head when tied), configs,
    tokenizer record, counters, plus optimizer/rng state that sampling ignores."""
    torch.save({
        "format_version": 1, "model": model.state_dict(),
        "model_config": model_config or model.config.to_dict(),
        "train_config": {"data_dir": data_dir, "out_dir": os.path.dirname(path)},
        "tokenizer": info, "step": 100, "tokens_seen": 12800, "best_val_loss": 3.0,
        "optimizer": {"state": {}, "param_groups": []}, "rng": [{"torch": torch.get_rng_state()}],
    }, path)
    return str(path)


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """sample.main() sets torch's CPU threads for the process (hardware.configure_cpu_threads);
    give the other tests in this process their count back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["sentencepiece", "tiktoken"])
def kind(request):
    return request.param


def make_run(directory, kind: str, rigged: bool = True):
    """An out_dir as train.py leaves it: ckpt.pt plus the tokenizer file beside it."""
    os.makedirs(directory, exist_ok=True)
    info = WRITERS[kind](directory)
    tok = load_tokenizer(info, str(directory))
    model = rigged_model(tok) if rigged else random_model(tok.vocab_size)
    save_checkpoint(os.path.join(directory, "ckpt.pt"), model, info)
    return str(directory), tok


def load_run(out_dir: str):
    path = checkpoint.find_checkpoint(out_dir, None)
    ckpt = checkpoint.load_checkpoint(path)
    return checkpoint.model_from_checkpoint(ckpt, "cpu", torch.float32, name=path), checkpoint.load_checkpoint_tokenizer(ckpt, path)


def run_cli(*args, stdin: str = "", env_extra=None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), *map(str, args)], cwd=REPO,
                          input=stdin.encode(), capture_output=True, env=env, timeout=120)


def run_main(capsys, *args) -> str:
    sample.main([str(a) for a in args])
    return capsys.readouterr().out


def utf8_states(tok, ids) -> list:
    """The rigged model's UTF-8 state after each of its generated tokens (starting at 0)."""
    states, state = [], 0
    for t in ids:
        state = utf8_state(token_bytes(tok, t), state)
        states.append(state)
    return states


def assert_no_replacement_mid_stream(text: str, tok, new_ids) -> None:
    """U+FFFD may only stand for a last character cut off by max_new_tokens, exactly where
    tokenizer.decode puts one too; everything before it must be clean."""
    states = utf8_states(tok, new_ids)
    assert None not in states
    if states[-1] == 1:
        assert text.endswith(REPLACEMENT)
        text = text[:-1]
    assert REPLACEMENT not in text


# ----------------------------------------------------------------------------- the streamer


class ByteTokenizer:
    """One token per byte, decoded like every real tokenizer: invalid UTF-8 becomes U+FFFD."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_streamer_joins_bytes_of_split_characters_without_replacement_chars():
    text = "Привет, мир! Ёж € 😀 ok"
    ids = list(text.encode("utf-8"))
    streamer = sample.TextStreamer(ByteTokenizer())
    emitted = ""
    for i, t in enumerate(ids):
        chunk = streamer.put(t)
        assert REPLACEMENT not in chunk
        emitted += chunk
        # At every step: exactly the characters whose bytes have all arrived.
        assert emitted == bytes(ids[: i + 1]).decode("utf-8", errors="ignore")
    assert streamer.end() == ""
    assert emitted == streamer.text == text
    assert "".join(stream_decode(ByteTokenizer(), ids)) == text


def test_streamer_reproduces_really_invalid_bytes_like_decode():
    ids = [0x61, 0xD0, 0x62, 0x80, 0xD0, 0xBF, 0xF0, 0x9F]  # a, lone lead, b, stray cont., п, cut emoji
    chunks = list(stream_decode(ByteTokenizer(), ids))
    assert "".join(chunks) == ByteTokenizer().decode(ids) == "a\ufffdb\ufffdп\ufffd"
    assert chunks[-1] == REPLACEMENT  # the unfinished emoji shows only once nothing can complete it


def test_streamer_matches_tokenizer_decode_at_every_split_point(tmp_path, kind):
    tok = load_tokenizer(WRITERS[kind](tmp_path), str(tmp_path))
    text = "Привет, Ёжик 😀 hello  мир\tи всё"  # Ё, 😀 and ё are byte-fallback / split in both
    ids = tok.encode(text)
    full = tok.decode(ids)  # SentencePiece's NFKC / whitespace rules may differ from `text`
    split_chars = 0
    for k in range(1, len(ids)):
        context, rest = ids[:k], ids[k:]
        if REPLACEMENT in tok.decode(context):
            split_chars += 1
            continue  # a context must end on a character boundary, as any encode() output does
        chunks = list(stream_decode(tok, rest, context=context))
        assert tok.decode(context) + "".join(chunks) == full, k
        assert all(REPLACEMENT not in c for c in chunks)
    assert split_chars > 0  # the case we care about was really there


# ----------------------------------------------------------------------------- the CLI, streaming


def test_cli_streams_cyrillic_as_utf8_equal_to_decode(tmp_path, kind):
    out_dir, tok = make_run(tmp_path / "out", kind)
    # A non-UTF-8 stdout encoding: sample.py must switch to UTF-8 itself.
    result = run_cli("--out_dir", out_dir, "--start", "Привет", "--max_new_tokens", 40, "--seed", 1,
                     env_extra={"PYTHONIOENCODING": "latin-1"})
    assert result.returncode == 0, result.stderr.decode()
    stdout = result.stdout.decode("utf-8")  # strict: raises on any invalid byte
    assert stdout.startswith("Привет")

    # The same sampling in-process gives the token ids; the printed text must be their decode.
    model, tok = load_run(out_dir)
    prompt = tok.encode("Привет")
    written = []
    new_ids, new_text, reason = sample.stream_sample(model, tok, prompt, written.append, 40,
                                                     generator=torch.Generator().manual_seed(1))
    assert reason == "max_new_tokens" and len(new_ids) == 40
    assert stdout == tok.decode(prompt + new_ids) + "\n"
    assert "".join(written) == new_text == stdout[len("Привет"):-1]
    assert_no_replacement_mid_stream(stdout[:-1], tok, new_ids)
    assert utf8_states(tok, new_ids).count(1) >= 5  # characters really were split across tokens
    assert "step 100" in result.stderr.decode()  # the note about what was loaded goes to stderr


def test_seed_reproduces_and_another_seed_differs(tmp_path, capsys):
    out_dir, _ = make_run(tmp_path, "tiktoken")
    args = ["--out_dir", out_dir, "--start", "Привет", "--max_new_tokens", 30]
    first = run_main(capsys, *args, "--seed", 7)
    assert run_main(capsys, *args, "--seed", 7) == first
    assert run_main(capsys, *args, "--seed", 8) != first


def test_temperature_zero_is_greedy_whatever_the_seed(tmp_path, capsys):
    out_dir, tok = make_run(tmp_path, "sentencepiece", rigged=False)
    args = ["--out_dir", out_dir, "--start", "Привет", "--max_new_tokens", 20, "--temperature", 0, "--no_stop_at_eot"]
    first = run_main(capsys, *args, "--seed", 1)
    assert run_main(capsys, *args, "--seed", 2) == first
    model, tok = load_run(out_dir)
    prompt = torch.tensor([tok.encode("Привет")])
    greedy = model.generate(prompt, 20, temperature=0)[0].tolist()
    assert first == tok.decode(greedy) + "\n"


@pytest.mark.compile
def test_compile_on_cpu_gives_the_greedy_text_of_eager_decoding(tmp_path, capsys):
    out_dir, _ = make_run(tmp_path, "tiktoken", rigged=False)
    args = ["--out_dir", out_dir, "--start", "Привет", "--max_new_tokens", 16, "--temperature", 0, "--no_stop_at_eot",
            "--device", "cpu", "--dtype", "float32"]
    eager = run_main(capsys, *args)
    sample.main([str(a) for a in args] + ["--compile"])
    compiled = capsys.readouterr()
    assert compiled.out == eager and "Привет" in eager
    assert re.search(r"cpu float32 \(--dtype float32\), \d+ CPU threads? \(", compiled.err)  # the start-up note
    # how the step was compiled, measured on this model: loops or BLAS, and the two rates behind it
    assert re.search(r"decode step compiled, one-row matmuls (as Inductor loops|through BLAS) \(float32 weights "
                     r"streamed at [\d.]+ GB/s in a row sum, [\d.]+ GB/s through BLAS gemv\)", compiled.err)


def test_compile_without_a_cpu_compiler_says_so_and_runs_eagerly(tmp_path, capsys, monkeypatch):
    out_dir, _ = make_run(tmp_path, "tiktoken", rigged=False)
    args = ["--out_dir", out_dir, "--start", "Привет", "--max_new_tokens", 5, "--temperature", 0, "--device", "cpu"]
    eager = run_main(capsys, *args)
    monkeypatch.setattr(sample.shutil, "which", lambda name: None)
    sample.main([str(a) for a in args] + ["--compile"])
    out = capsys.readouterr()
    assert out.out == eager
    assert "--compile on CPU needs a C++ compiler" in out.err


def test_start_from_file_and_num_samples(tmp_path, capsys):
    out_dir, tok = make_run(tmp_path / "out", "tiktoken")
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("Жили-были дед да баба.\nПривет", encoding="utf-8")
    out = run_main(capsys, "--out_dir", out_dir, "--start", f"FILE:{prompt_file}", "--num_samples", 3,
                   "--max_new_tokens", 10, "--seed", 3)
    samples = out.split("\n" + sample.SEPARATOR + "\n")
    assert len(samples) == 3
    assert all(s.startswith("Жили-были дед да баба.\nПривет") for s in samples)
    assert len(set(samples)) == 3  # one generator, drawn on: the samples differ


def test_explicit_ckpt_and_numbered_fallback(tmp_path, capsys):
    out_dir, _ = make_run(tmp_path / "run", "tiktoken")
    os.replace(os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "ckpt_000100.pt"))
    explicit = run_main(capsys, "--out_dir", tmp_path / "nowhere", "--ckpt", os.path.join(out_dir, "ckpt_000100.pt"),
                        "--start", "Привет", "--max_new_tokens", 8, "--seed", 0)
    assert explicit.startswith("Привет") and len(explicit) > len("Привет\n")
    # With ckpt.pt gone, the newest numbered copy is the latest checkpoint.
    assert checkpoint.find_checkpoint(out_dir, None) == os.path.join(out_dir, "ckpt_000100.pt")


def test_empty_start_begins_a_document_and_bfloat16_runs(tmp_path, capsys):
    out_dir, tok = make_run(tmp_path, "tiktoken")
    out = run_main(capsys, "--out_dir", out_dir, "--max_new_tokens", 12, "--seed", 0, "--dtype", "bfloat16")
    assert EOT not in out and out.strip()


def test_tokenizer_falls_back_to_the_data_dir(tmp_path):
    out_dir, _ = make_run(tmp_path / "out", "sentencepiece")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    os.replace(os.path.join(out_dir, "tokenizer.model"), data_dir / "tokenizer.model")
    path = os.path.join(out_dir, "ckpt.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["train_config"]["data_dir"] = str(data_dir)
    torch.save(ckpt, path)
    tok = checkpoint.load_checkpoint_tokenizer(checkpoint.load_checkpoint(path), path)
    assert tok.decode(tok.encode("Привет")) == "Привет"
    # A run on a mixture (--data_dir="a:0.7,b:0.3"): its datasets share the tokenizer.
    for mixture in (f"{tmp_path / 'gone'}:0.7,{data_dir}:0.3", f"{data_dir}:1,{tmp_path / 'gone'}"):
        ckpt["train_config"]["data_dir"] = mixture
        assert checkpoint.checkpoint_tokenizer_path(ckpt, path) == str(data_dir / "tokenizer.model")


# ----------------------------------------------------------------------------- end of text, Ctrl-C


def test_stops_at_end_of_text_unless_told_not_to(tmp_path):
    out_dir, _ = make_run(tmp_path, "tiktoken")
    model, tok = load_run(out_dir)
    with torch.no_grad():
        model.lm_head.weight[tok.eot_id, 0] = 10.0  # after any whole character, end the document
    prompt = tok.encode("Привет")
    assert sample.stream_sample(model, tok, prompt, print, 5, temperature=0) == ([], "", "eos")
    ids, text, reason = sample.stream_sample(model, tok, prompt, lambda s: None, 5, temperature=0, stop_at_eot=False)
    assert (ids, text, reason) == ([tok.eot_id] * 5, EOT * 5, "max_new_tokens")


def test_ids_beyond_the_tokenizer_are_never_sampled(tmp_path):
    _, tok = make_run(tmp_path, "tiktoken")
    model = random_model(tok.vocab_size + 8, tie_embeddings=False)  # a padded vocab, as --vocab_size allows
    with torch.no_grad():  # identity blocks, every hidden state = one-hot 0: the padding rows win
        for block in model.layers:
            block.attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        model.embed.weight.zero_()
        model.embed.weight[:, 0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[tok.vocab_size:, 0] = 10.0
    ids, text, reason = sample.stream_sample(model, tok, tok.encode("Привет"), print, 5, temperature=0)
    # The padding rows would win every argmax; they are masked, so the best real token is taken.
    assert len(ids) == 5 and max(ids) < tok.vocab_size and reason == "max_new_tokens"
    assert text == tok.decode(ids)


def interrupt_after(model: Transformer, calls: int) -> None:
    """Make the model raise KeyboardInterrupt (as Ctrl-C would) on its calls-th forward."""
    original, count = model.forward_cached, [0]

    def forward_cached(*args, **kwargs):
        count[0] += 1
        if count[0] == calls:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    model.forward_cached = forward_cached


def test_ctrl_c_ends_only_the_current_generation(tmp_path):
    out_dir, _ = make_run(tmp_path, "tiktoken")
    model, tok = load_run(out_dir)
    interrupt_after(model, 4)  # prefill + 2 decode steps succeed: 3 tokens
    prompt = tok.encode("Привет")
    written = []
    ids, text, reason = sample.stream_sample(model, tok, prompt, written.append, 40, generator=torch.Generator().manual_seed(0))
    assert reason == "interrupted" and len(ids) == 3
    assert "".join(written) == text == tok.decode(prompt + ids)[len("Привет"):]
    assert model.layers[0].attn.cache is None  # the KV cache was released


def test_interactive_ctrl_c_returns_to_the_prompt(tmp_path, monkeypatch, capsys):
    out_dir, _ = make_run(tmp_path, "tiktoken")
    model, tok = load_run(out_dir)
    interrupt_after(model, 3)
    lines = iter(["Привет", "мир"])

    def read_line():
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(sample, "read_line", read_line)
    settings = dict(max_new_tokens=10, generator=torch.Generator().manual_seed(0))
    written = []
    sample.run_interactive(model, tok, "", settings, written.append)
    out = "".join(written).split("\n")
    assert len(out) == 3 and out[2] == ""
    assert 0 < len(out[0]) < len(out[1])  # cut short after two tokens, then a full second turn
    assert "[stopped]" in capsys.readouterr().err


# ----------------------------------------------------------------------------- interactive CLI


def test_interactive_two_turns_then_eof(tmp_path):
    out_dir, _ = make_run(tmp_path, "tiktoken")
    lines = ["Привет", "мир " * 12 + "конец"]  # the second turn outgrows max_seq_len - max_new_tokens
    result = run_cli("--out_dir", out_dir, "--interactive", "--max_new_tokens", 40, "--seed", 5,
                     stdin="".join(line + "\n" for line in lines))
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    assert "Traceback" not in stderr
    turns = result.stdout.decode("utf-8").split("\n")
    assert len(turns) == 3 and turns[2] == ""  # two generations, each ended by a newline
    assert stderr.count("most recent") == 1  # cropping the context is announced once

    # Each turn continues everything so far: the earlier lines and the model's own text.
    model, tok = load_run(out_dir)
    generator, text = torch.Generator().manual_seed(5), ""
    for line, printed in zip(lines, turns):
        text = f"{text}\n{line}" if text else line
        context = sample.fit_context(tok.encode(text), model.config.max_seq_len, 40)
        new_ids, new_text, _ = sample.stream_sample(model, tok, context, lambda s: None, 40, generator=generator)
        assert printed == new_text
        assert_no_replacement_mid_stream(printed, tok, new_ids)
        text += new_text
    assert len(tok.encode(text)) > model.config.max_seq_len - 40


# ----------------------------------------------------------------------------- errors


class Exploit:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def error_cases(tmp_path) -> dict:
    """name -> (argv, a phrase the message must contain). Built on disk up front so that the
    subprocesses can run side by side."""
    cases = {}
    cases["no out_dir"] = (["--out_dir", tmp_path / "missing"], "run train.py first")
    (tmp_path / "empty").mkdir()
    cases["no ckpt.pt"] = (["--out_dir", tmp_path / "empty"], str(tmp_path / "empty" / "ckpt.pt"))
    cases["no such --ckpt"] = (["--ckpt", tmp_path / "nope.pt"], "does not exist")

    out_dir, tok = make_run(tmp_path / "mismatch", "tiktoken", rigged=False)
    wrong = random_model(tok.vocab_size).config.to_dict() | {"n_embd": 32}
    save_checkpoint(os.path.join(out_dir, "ckpt.pt"), random_model(tok.vocab_size), load_info(out_dir), model_config=wrong)
    cases["config mismatch"] = (["--out_dir", out_dir], "does not match its model_config")

    (tmp_path / "corrupt.pt").write_bytes(b"\x00not a checkpoint" * 50)
    cases["corrupt file"] = (["--ckpt", tmp_path / "corrupt.pt"], "not a readable PyTorch checkpoint")

    torch.save({"weights": torch.zeros(2)}, tmp_path / "dict.pt")
    cases["foreign checkpoint"] = (["--ckpt", tmp_path / "dict.pt"], "not a HomeLLM checkpoint")

    out_dir, _ = make_run(tmp_path / "notok", "sentencepiece", rigged=False)
    os.remove(os.path.join(out_dir, "tokenizer.model"))
    cases["tokenizer file missing"] = (["--out_dir", out_dir], "tokenizer file tokenizer.model")

    out_dir, _ = make_run(tmp_path / "badtok", "sentencepiece", rigged=False)
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(b"garbage")
    cases["tokenizer unloadable"] = (["--out_dir", out_dir], "SentencePiece")

    cases["bad flag value"] = (["--out_dir", out_dir, "--top_p", "1.5"], "--top_p=1.5")

    torch.save({"model": Exploit(tmp_path / "pwned"), "model_config": {}}, tmp_path / "evil.pt")
    cases["untrusted pickle"] = (["--ckpt", tmp_path / "evil.pt"], "refusing to load")
    return cases


def load_info(out_dir: str) -> dict:
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)["tokenizer"]


@pytest.mark.parametrize("tie", [True, False])
def test_a_checkpoint_loads_in_its_dtype_without_an_fp32_model_first(tie):
    """model_from_checkpoint builds on the meta device and casts each stored tensor straight
    into place: no random init and no fp32 copy of the model (a 3B model in bf16 then loads on
    a 12 GB GPU). Every tensor the load creates is recorded; none is an fp32 matrix."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    source = random_model(300, n_embd=64, max_seq_len=64, tie_embeddings=tie)  # RoPE tables (64 x 32) below any matrix
    ckpt = {"model": source.state_dict(), "model_config": source.config.to_dict()}

    class Created(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.tensors = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.tensors += [(t.dtype, t.device.type, t.numel()) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            return out

    with Created() as created:
        loaded = checkpoint.model_from_checkpoint(ckpt, "cpu", torch.bfloat16)
    smallest_matrix = 64 * 64
    assert not [t for t in created.tensors if t[0] == torch.float32 and t[1] != "meta" and t[2] >= smallest_matrix]
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16} and not loaded.training
    assert (loaded.lm_head.weight is loaded.embed.weight) is tie
    with torch.no_grad():
        assert torch.equal(loaded.rope_cos, source.rope_cos.bfloat16())  # derived tables filled, not left empty
        assert all(torch.equal(v.bfloat16(), loaded.state_dict()[k]) for k, v in source.state_dict().items())
        idx = torch.randint(0, 300, (1, 12))
        assert torch.equal(loaded.generate(idx, 8, temperature=0), source.to(torch.bfloat16).eval().generate(idx, 8, temperature=0))


def test_an_untrusted_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": Exploit(marker), "model_config": {}}, path)
    torch.load(path, weights_only=False)  # proof that the payload is live when trusted ...
    assert marker.exists()
    marker.unlink()
    with pytest.raises(checkpoint.CheckpointError, match="refusing to load .*posix.system"):
        checkpoint.load_checkpoint(str(path))  # ... and that sample.py never trusts it
    assert not marker.exists()  # (the CLI is checked in test_errors_in_a_real_process_...)


def test_errors_are_one_clear_line_with_nonzero_exit(tmp_path, capsys):
    for name, (argv, phrase) in error_cases(tmp_path).items():
        with pytest.raises(SystemExit) as exit_:
            sample.main([str(a) for a in argv])
        captured = capsys.readouterr()
        message = captured.err
        assert exit_.value.code == (2 if name == "bad flag value" else 1), name  # usage errors exit 2, as argparse's
        assert message.startswith("error: ") and message.count("\n") == 1, (name, message)
        assert phrase in message, (name, message)
        assert captured.out == "", name


def test_errors_in_a_real_process_print_no_traceback(tmp_path):
    cases = error_cases(tmp_path)
    script = os.path.join(REPO, "sample.py")
    # Side by side: each process spends most of its time importing torch.
    procs = {
        name: subprocess.Popen([sys.executable, script, *map(str, cases[name][0])], cwd=REPO, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for name in ("no ckpt.pt", "config mismatch", "tokenizer unloadable", "untrusted pickle")
    }
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        stderr = stderr.decode()
        assert proc.returncode == 1, name
        assert "Traceback" not in stderr, (name, stderr)
        assert stderr.count("\n") == 1 and stderr.startswith("error: "), (name, stderr)
        assert cases[name][1] in stderr, (name, stderr)
        assert stdout == b"", name
    assert not (tmp_path / "pwned").exists()  # the exploit's command never ran
