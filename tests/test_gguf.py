"""export_hf.py --gguf: GGUF files that llama.cpp runs exactly as HomeLLM does.

The structure checks read the files back with the gguf package's own reader and always run.
The checks in real llama.cpp (llama-cpp-python) skip where it is not installed, unless
HOMELLM_REQUIRE_LLAMA_CPP=1 (CI, which installs requirements-llama.txt) makes that a failure.
Nothing here evaluates a q8_0 file in llama.cpp: its AMX code crashes on such files on CPUs that
have AMX (llama.cpp issue 20824); q8_0 is checked byte for byte against llama.cpp's own quantizer.
"""

import ctypes
import itertools
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import sentencepiece as spm
import torch

import gguf

import export_hf
import gguf_export
import prepare
import tokenizer as toklib
import train
from checkpoint import load_checkpoint, load_checkpoint_tokenizer, model_from_checkpoint
from conftest import CHAT_TINY, TINY, copy_conversation, learn_bpe_ranks, shard_checkpoint, write_copy_conversations
from model import ModelConfig, Transformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(2)

try:
    import llama_cpp
except ImportError:
    llama_cpp = None


def require_llama_cpp() -> None:
    if llama_cpp is None:
        why = "llama-cpp-python is not installed (pip install -r requirements-llama.txt builds it)"
        if os.environ.get("HOMELLM_REQUIRE_LLAMA_CPP") == "1":
            pytest.fail(why + " (HOMELLM_REQUIRE_LLAMA_CPP=1)")
        pytest.skip(why)


SENTENCES = [
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "В чащах юга жил бы цитрус? Да, но фальшивый экземпляр!",
    "«Ёлочки» — это кавычки, а ёжик живёт в лесу.",
    "В 1961 году Гагарин полетел в космос, а в 2024 году — нет.",
    "Hello world, это смешанный текст с English словами.",
    "Москва — столица России.\nСанкт-Петербург — северная столица.",
    "Эмодзи 😀 тоже бывают 👍 в тексте.",
]
# Where tokenizers part ways: leading and double spaces, newlines, digit runs, Latin, «ёлочки»,
# emoji (byte fallback), special tokens' text in plain text, the empty string.
PROBES = [
    "Привет, мир!",
    " Пробел в начале строки",
    "  Два пробела в начале, и  два  посередине",
    "Первая строка\nвторая строка\n\nпосле пустой\n",
    "Цифры: 0, 7, 42, 1961, 2024 и 123456789; дробь 3,14",
    "Latin words: hello world, GGUF, llama.cpp и Ollama",
    "«Ёлочки» — кавычки; ёжик, Ёж и ещё",
    "Эмодзи 😀, 👍🏽 и флаг 🇷🇺 в тексте",
    "\tтабуляция и пробелы в конце   ",
    "Специальные слова как текст: <unk> </s> <|endoftext|>",
    "",
]
OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def corpus(lines: int = 1200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = " ".join(SENTENCES).split(" ")
    return SENTENCES + [" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))) for _ in range(lines)]


@dataclass
class Run:
    out_dir: str
    cfg: ModelConfig
    tokenizer: toklib.Tokenizer
    model: Transformer
    info: dict  # the checkpoint's tokenizer record

    def gguf(self, outtype: str) -> str:
        return os.path.join(self.out_dir, "export", f"model-{outtype}.gguf")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    """Two tiny trained models, each exported to GGUF in every outtype through the command line:
    "sp": an sp:N tokenizer, architecture llama (tied embeddings, GQA); "bpe": a .tiktoken BPE
    with cl100k's regex, architecture qwen2 (q/k/v biases, untied, embedding rows padded past
    the tokenizer's)."""
    root = tmp_path_factory.mktemp("gguf")
    (root / "corpus.txt").write_text("\n".join(corpus()) + "\n", encoding="utf-8")
    toklib.write_tiktoken_ranks(learn_bpe_ranks(corpus(), toklib.DEFAULT_TIKTOKEN_PATTERN, 300), str(root / "bpe.tiktoken"))
    runs = {}
    for name, tokenizer, extra in (("sp", "sp:400", []),
                                   ("bpe", str(root / "bpe.tiktoken"), ["--qkv_bias=True", "--tie_embeddings=False", "--vocab_size=600"])):
        data, out = str(root / f"data-{name}"), str(root / f"out-{name}")
        assert prepare.main(["--input", str(root / "corpus.txt"), "--tokenizer", tokenizer, "--out_dir", data,
                             "--workers", "1", "--no_progress"]) == 0
        train.main([*TINY, f"--data_dir={data}", f"--out_dir={out}", "--block_size=64", "--max_iters=200", "--eval_interval=200",
                    "--dtype=float32", *extra])
        for outtype in OUTTYPES:
            export_hf.main(["--out_dir", out, "--gguf", os.path.join(out, "export", f"model-{outtype}.gguf"), "--outtype", outtype,
                            "--overwrite"])  # the Modelfile of the previous outtype is replaced
        ckpt_path = os.path.join(out, "ckpt.pt")
        ckpt = load_checkpoint(ckpt_path)
        runs[name] = Run(out, ModelConfig.from_dict(ckpt["model_config"]), load_checkpoint_tokenizer(ckpt, ckpt_path),
                         model_from_checkpoint(ckpt, "cpu", torch.float32), ckpt["tokenizer"])
    return runs


def field(reader: "gguf.GGUFReader", key: str):
    return reader.fields[key].contents()


def tensors(reader: "gguf.GGUFReader") -> dict[str, "gguf.ReaderTensor"]:
    return {t.name: t for t in reader.tensors}


def as_float(t: "gguf.ReaderTensor") -> np.ndarray:
    """A tensor's values in f32, in PyTorch's shape (GGUF lists dimensions innermost first)."""
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(d) for d in t.shape])))


# ----------------------------------------------------------------------------- structure (gguf's reader)


@pytest.mark.parametrize("name", ["sp", "bpe"])
def test_gguf_holds_the_model_and_tokenizer_as_llama_cpp_reads_them(runs, name):
    run = runs[name]
    cfg, info = run.cfg, run.info
    reader = gguf.GGUFReader(run.gguf("f16"))
    arch = field(reader, "general.architecture")
    assert arch == ("llama" if name == "sp" else "qwen2")
    assert (cfg.qkv_bias, cfg.tie_embeddings) == ((False, True) if name == "sp" else (True, False))
    expected = {"context_length": cfg.max_seq_len, "embedding_length": cfg.n_embd, "block_count": cfg.n_layer,
                "feed_forward_length": cfg.ffn_hidden, "attention.head_count": cfg.n_head, "attention.head_count_kv": 2,
                "rope.dimension_count": cfg.head_dim, "vocab_size": cfg.vocab_size}
    assert {key: field(reader, f"{arch}.{key}") for key in expected} == expected
    assert field(reader, f"{arch}.rope.freq_base") == pytest.approx(cfg.rope_theta)
    assert field(reader, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.norm_eps)
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16

    # The tokenizer: every embedding row a token, at its own id, of the right type.
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == cfg.vocab_size
    assert field(reader, "tokenizer.ggml.eos_token_id") == info["eot_id"]
    assert field(reader, "tokenizer.ggml.add_bos_token") is False and field(reader, "tokenizer.ggml.add_eos_token") is False
    T = gguf.TokenType
    if name == "sp":
        sp = spm.SentencePieceProcessor(model_file=os.path.join(run.out_dir, "tokenizer.model"))
        assert field(reader, "tokenizer.ggml.model") == "llama"
        assert field(reader, "tokenizer.ggml.add_space_prefix") is False  # llama.cpp assumes true without it
        assert tokens == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        assert field(reader, "tokenizer.ggml.scores") == pytest.approx([sp.get_score(i) for i in range(cfg.vocab_size)])
        assert field(reader, "tokenizer.ggml.unknown_token_id") == sp.unk_id() == 0
        assert (types[sp.unk_id()], types[info["eot_id"]], types[tokens.index("<0x0A>")], types[tokens.index("▁")]) == (
            T.UNKNOWN, T.CONTROL, T.BYTE, T.NORMAL)
    else:
        n = run.tokenizer.vocab_size  # 556 learned tokens + <|endoftext|>; rows up to 600 are padding
        assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.pre") == "llama-bpe"
        assert (tokens[info["eot_id"]], types[info["eot_id"]]) == ("<|endoftext|>", T.CONTROL) and info["eot_id"] == n - 1
        assert tokens[n:] == [f"[PAD{i}]" for i in range(n, 600)] and set(types[n:]) == {T.UNUSED}
        char_byte = {c: b for b, c in toklib.bytes_to_unicode().items()}
        for i in range(n - 1):
            assert bytes(char_byte[c] for c in tokens[i]) == run.tokenizer.impl.decode_single_token_bytes(i)
        assert len(field(reader, "tokenizer.ggml.merges")) == n - 1 - 256  # one merge per learned token

    # The weights: llama.cpp's names and shapes, norms and biases in f32, matrices in f16.
    found = tensors(reader)
    names = {"token_embd.weight", "output_norm.weight"} | ({"output.weight"} if not cfg.tie_embeddings else set())
    for i in range(cfg.n_layer):
        names |= {f"blk.{i}.{part}.weight" for part in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm",
                                                         "ffn_gate", "ffn_up", "ffn_down")}
        names |= {f"blk.{i}.attn_{p}.bias" for p in "qkv"} if cfg.qkv_bias else set()
    assert set(found) == names
    assert [int(d) for d in found["token_embd.weight"].shape] == [cfg.n_embd, cfg.vocab_size]  # innermost first
    assert [int(d) for d in found["blk.1.ffn_down.weight"].shape] == [cfg.ffn_hidden, cfg.n_embd]
    for tensor_name, t in found.items():
        assert t.tensor_type == (gguf.GGMLQuantizationType.F32 if len(t.shape) == 1 else gguf.GGMLQuantizationType.F16), tensor_name


@pytest.mark.parametrize("name", ["sp", "bpe"])
def test_gguf_weights_are_ours_with_q_k_rows_in_llama_cpp_rope_order(runs, name):
    run = runs[name]
    cfg, state = run.cfg, run.model.state_dict()
    found = tensors(gguf.GGUFReader(run.gguf("f32")))
    assert np.array_equal(as_float(found["token_embd.weight"]), state["embed.weight"].numpy())
    assert np.array_equal(as_float(found["blk.1.ffn_down.weight"]), state["layers.1.mlp.down_proj.weight"].numpy())
    if not cfg.tie_embeddings:
        assert np.array_equal(as_float(found["output.weight"]), state["lm_head.weight"].numpy())
    q, k = state["layers.0.attn.q_proj.weight"], state["layers.0.attn.k_proj.weight"]
    q_gguf, k_gguf = as_float(found["blk.0.attn_q.weight"]), as_float(found["blk.0.attn_k.weight"])
    if name == "bpe":  # qwen2 rotates halves, as we do: stored as is, biases too
        assert np.array_equal(q_gguf, q.numpy()) and np.array_equal(k_gguf, k.numpy())
        assert np.array_equal(as_float(found["blk.0.attn_q.bias"]), state["layers.0.attn.q_proj.bias"].numpy())
        return
    # llama rotates adjacent pairs: in each head, our rows i and i + head_dim/2 become rows 2i and 2i+1.
    half = cfg.head_dim // 2
    for ours, theirs, heads in ((q.numpy(), q_gguf, cfg.n_head), (k.numpy(), k_gguf, cfg.n_kv_head)):
        ours, theirs = ours.reshape(heads, 2, half, -1), theirs.reshape(heads, half, 2, -1)
        assert np.array_equal(theirs[:, :, 0], ours[:, 0]) and np.array_equal(theirs[:, :, 1], ours[:, 1])


def test_modelfile_runs_the_gguf_with_the_trained_context(runs):
    run = runs["sp"]
    modelfile = open(os.path.join(run.out_dir, "export", "Modelfile"), encoding="utf-8").read()
    lines = modelfile.splitlines()
    assert "FROM ./model-q8_0.gguf" in lines  # the last export of the fixture, next to the Modelfile
    assert f"PARAMETER num_ctx {run.cfg.max_seq_len}" in lines
    assert 'TEMPLATE """{{ .Prompt }}"""' in lines and "PARAMETER temperature 0.8" in lines and "PARAMETER top_k 200" in lines


def test_a_sharded_checkpoint_exports_the_same_gguf(runs, tmp_path):
    """An FSDP run's ckpt_STEP/ is read on the CPU (no process group, no GPU) into the same file
    as its ckpt.pt."""
    run = runs["sp"]
    run_dir = tmp_path / os.path.basename(run.out_dir)  # the GGUF's general.name
    run_dir.mkdir()
    shard_checkpoint(os.path.join(run.out_dir, "ckpt.pt"), run_dir / "ckpt_000200")
    shutil.copy(os.path.join(run.out_dir, "tokenizer.model"), run_dir)
    export_hf.main(["--out_dir", str(run_dir), "--gguf", str(tmp_path / "gguf" / "model.gguf"), "--outtype", "f32"])
    assert (tmp_path / "gguf" / "model.gguf").read_bytes() == open(run.gguf("f32"), "rb").read()


@pytest.mark.parametrize("outtype", ["bf16", "q8_0"])
def test_outtypes_store_matrices_in_their_type(runs, outtype):
    found = tensors(gguf.GGUFReader(runs["bpe"].gguf(outtype)))
    kind = gguf.GGMLQuantizationType[outtype.upper()]
    assert {t.tensor_type for t in found.values() if len(t.shape) == 2} == {kind}
    assert {t.tensor_type for t in found.values() if len(t.shape) == 1} == {gguf.GGMLQuantizationType.F32}
    embed = runs["bpe"].model.state_dict()["embed.weight"].numpy()
    np.testing.assert_allclose(as_float(found["token_embd.weight"]), embed, atol=np.abs(embed).max() / 100)


# ----------------------------------------------------------------------------- special tokens and regexes


def tiny_checkpoint(tmp_path, info: dict, ranks: dict[bytes, int], vocab_size: int) -> str:
    """An untrained one-layer model with this tokenizer (tiktoken ranks, or None when
    out/tokenizer.model is already there), saved as train.py would."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    if ranks is not None:
        toklib.write_tiktoken_ranks(ranks, str(out / "tokenizer.tiktoken"))
    cfg = ModelConfig(vocab_size=vocab_size, n_layer=1, n_head=2, n_embd=32, ffn_hidden=64, max_seq_len=64)
    torch.save({"model": Transformer(cfg).state_dict(), "model_config": cfg.to_dict(), "train_config": {}, "tokenizer": info,
                "step": 1, "tokens_seen": 0}, out / "ckpt.pt")
    return str(out / "ckpt.pt")


# One regex spelling per llama.cpp pre-tokenizer we map to, learned on the corpus.
PATTERNS = {
    "cl100k (tiktoken)": toklib.DEFAULT_TIKTOKEN_PATTERN,
    "cl100k (Llama 3 tokenizer.json)": next(p for p, n in gguf_export.LLAMA_CPP_PRE_TOKENIZERS.items()
                                             if n == "llama-bpe" and p != toklib.DEFAULT_TIKTOKEN_PATTERN),
    "qwen2": toklib.QWEN2_PAT_STR,
    "gpt2 (tokenizers)": toklib.GPT2_PAT_STR,
    "gpt2 (tiktoken)": next(p for p, n in gguf_export.LLAMA_CPP_PRE_TOKENIZERS.items() if n == "gpt-2" and p != toklib.GPT2_PAT_STR),
}


@pytest.mark.parametrize("placement", ["first", "last", "gap"])
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_bpe_special_tokens_keep_their_ids_and_llama_cpp_splits_like_tiktoken(tmp_path, pattern, placement):
    """GPT-2 style (<|endoftext|> = 0), appended (prepare.py's bare .tiktoken), and cl100k style
    (a special token inside the id range, an id no token has): llama.cpp sees each special token
    at its id and tokenizes text as tiktoken does with each regex we map to a pre-tokenizer."""
    pat_str = PATTERNS[pattern]
    learned = learn_bpe_ranks(corpus(300), pat_str, 120)
    shift = {"first": 1, "last": 0, "gap": 0}[placement]
    ranks = {token: rank + shift for token, rank in learned.items()}
    special = {"first": {"<|endoftext|>": 0}, "last": {"<|endoftext|>": len(ranks)},
               "gap": {"<|endoftext|>": 300, "<|fim_prefix|>": len(ranks) + 3}}[placement]
    if placement == "gap":  # ranks from 300 up move by 2: 300 is <|endoftext|>, 301 is nobody's
        ranks = {token: rank + 2 if rank >= 300 else rank for token, rank in ranks.items()}
        special["<|fim_prefix|>"] = max(ranks.values()) + 1
    eot = special["<|endoftext|>"]
    info = dict(kind="tiktoken", spec="test", file="tokenizer.tiktoken", name=None, pat_str=pat_str, special_tokens=special,
                eot_id=eot, bos_id=None)
    n_vocab = max([*ranks.values(), *special.values()]) + 1
    ckpt = tiny_checkpoint(tmp_path, info, ranks, n_vocab + 5)
    dest = str(tmp_path / "model.gguf")
    export_hf.main(["--ckpt", ckpt, "--gguf", dest])

    reader = gguf.GGUFReader(dest)
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    for content, token_id in special.items():
        assert (tokens[token_id], types[token_id]) == (content, gguf.TokenType.CONTROL)
    unassigned = sorted(set(range(n_vocab + 5)) - set(ranks.values()) - set(special.values()))
    assert [tokens[i] for i in unassigned] == [f"[PAD{i}]" for i in unassigned] and {types[i] for i in unassigned} == {gguf.TokenType.UNUSED}
    assert len(unassigned) == {"first": 5, "last": 5, "gap": 6}[placement]

    require_llama_cpp()
    ours = toklib.make_tiktoken(None, pat_str, ranks, special, eot)
    llm = llama_cpp.Llama(dest, vocab_only=True, verbose=False)
    mismatches = [t for t in PROBES + corpus(60, seed=3)[-60:] if llm.tokenize(t.encode(), add_bos=False, special=False) != ours.encode(t)]
    assert mismatches == []
    assert llm.tokenize(b"<|endoftext|>", add_bos=False, special=True) == [eot]
    assert llm.token_eos() == eot


def test_sentencepiece_with_a_dummy_prefix_keeps_it_in_llama_cpp(tmp_path):
    """A SentencePiece BPE that puts a space before the text (as Llama 2's does; sp:N does not)
    is written with add_space_prefix=true and tokenizes as SentencePiece does."""
    (tmp_path / "out").mkdir()
    options = {**toklib.SENTENCEPIECE_TRAINER_OPTIONS, "add_dummy_prefix": True, "num_threads": 1}
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus(300)), model_prefix=str(tmp_path / "out" / "tokenizer"),
                                   vocab_size=420, **options)
    ours = toklib.load_sentencepiece(str(tmp_path / "out" / "tokenizer.model"))
    info = dict(kind="sentencepiece", spec="test", file="tokenizer.model", name=None, pat_str=None, special_tokens={},
                eot_id=ours.eot_id, bos_id=None)
    dest = str(tmp_path / "model.gguf")
    export_hf.main(["--ckpt", tiny_checkpoint(tmp_path, info, None, ours.vocab_size), "--gguf", dest])
    assert field(gguf.GGUFReader(dest), "tokenizer.ggml.add_space_prefix") is True
    require_llama_cpp()
    llm = llama_cpp.Llama(dest, vocab_only=True, verbose=False)
    assert ours.impl.id_to_piece(ours.encode("Привет")[0]).startswith("▁")  # the prefix space is really there
    assert [t for t in PROBES if llm.tokenize(t.encode(), add_bos=False, special=False) != ours.encode(t)] == []


def test_export_refuses_what_llama_cpp_would_tokenize_differently(tmp_path, capsys):
    # A regex llama.cpp has no pre-tokenizer for (split on whitespace runs).
    ranks = learn_bpe_ranks(corpus(100), r"\S+|\s+", 20)
    info = dict(kind="tiktoken", spec="test", file="tokenizer.tiktoken", name=None, pat_str=r"\S+|\s+",
                special_tokens={"<|endoftext|>": len(ranks)}, eot_id=len(ranks), bos_id=None)
    ckpt = tiny_checkpoint(tmp_path, info, ranks, len(ranks) + 1)
    with pytest.raises(SystemExit) as exit_info:
        export_hf.main(["--ckpt", ckpt, "--gguf", str(tmp_path / "model.gguf")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count("\n") == 1
    assert err.startswith("error: llama.cpp has no pre-tokenizer that splits text with this tokenizer's regex")
    assert not (tmp_path / "model.gguf").exists() and not (tmp_path / "model.gguf.tmp").exists() and not (tmp_path / "Modelfile").exists()

    # Bytes alone: no merges, which llama.cpp's BPE cannot load (the file would not open).
    bytes_only = tmp_path / "bytes.tiktoken"
    toklib.write_tiktoken_ranks({bytes([b]): b for b in range(256)}, str(bytes_only))
    info = dict(info, pat_str=toklib.DEFAULT_TIKTOKEN_PATTERN, special_tokens={"<|endoftext|>": 256}, eot_id=256)
    with pytest.raises(gguf_export.GGUFError, match=r"no merges \(every token is a single byte\)"):
        gguf_export.gguf_vocab(info, str(bytes_only), 257)

    # A SentencePiece unigram model with SentencePiece's default normalization (NFKC).
    sp_dir = tmp_path / "sp"
    sp_dir.mkdir()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus(300)), model_prefix=str(sp_dir / "tokenizer"), vocab_size=420,
                                   model_type="unigram", byte_fallback=True, hard_vocab_limit=False, num_threads=1, minloglevel=2)
    with pytest.raises(gguf_export.GGUFError, match=r"unigram model .* BPE merges; it normalizes text"):
        gguf_export.gguf_vocab({"kind": "sentencepiece", "eot_id": 2}, str(sp_dir / "tokenizer.model"), 420)


def test_export_cli_errors_are_one_line(runs, tmp_path, capsys, monkeypatch):
    run = runs["sp"]
    with pytest.raises(SystemExit) as exit_info:  # an existing file is not replaced without --overwrite
        export_hf.main(["--out_dir", run.out_dir, "--gguf", run.gguf("f16")])
    assert exit_info.value.code == 1 and capsys.readouterr().err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_info:
        export_hf.main(["--out_dir", run.out_dir, "--outtype", "q8_0", "--to", str(tmp_path / "hf")])
    assert exit_info.value.code == 2 and "--outtype is the weight type of --gguf" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "gguf", None)  # the optional package missing
    with pytest.raises(SystemExit) as exit_info:
        export_hf.main(["--out_dir", run.out_dir, "--gguf", str(tmp_path / "model.gguf")])
    assert exit_info.value.code == 1 and capsys.readouterr().err == "error: writing GGUF needs the gguf package: pip install gguf\n"


# ----------------------------------------------------------------------------- in real llama.cpp


@pytest.mark.parametrize("name", ["sp", "bpe"])
def test_llama_cpp_tokenizes_like_homellm(runs, name):
    require_llama_cpp()
    run = runs[name]
    llm = llama_cpp.Llama(run.gguf("f16"), vocab_only=True, verbose=False)
    texts = PROBES + corpus(200, seed=7)[-200:]
    mismatches = [t for t in texts if llm.tokenize(t.encode(), add_bos=False, special=False) != run.tokenizer.encode(t)]
    assert mismatches == []
    for text in PROBES:
        ids = run.tokenizer.encode(text)
        assert llm.detokenize(ids).decode("utf-8") == run.tokenizer.decode(ids), text


def llama_logits(path: str, ids: list[int]) -> tuple["llama_cpp.Llama", np.ndarray]:
    """llama.cpp's logits for every position, with an f32 KV cache (its default f16 cache alone
    moves logits by ~1e-3)."""
    f32 = 0  # GGML_TYPE_F32
    llm = llama_cpp.Llama(path, n_ctx=64, n_batch=64, n_threads=2, logits_all=True, type_k=f32, type_v=f32, verbose=False)
    llm.eval(ids)
    return llm, np.array(llm.scores[: len(ids)])


@pytest.mark.parametrize("name", ["sp", "bpe"])
def test_llama_cpp_computes_our_logits_and_greedy_continuation(runs, name):
    require_llama_cpp()
    run = runs[name]
    ids = run.tokenizer.encode("В чащах юга")
    with torch.no_grad():
        ours = run.model(torch.tensor([ids]))[0].numpy()
    llm, theirs = llama_logits(run.gguf("f32"), ids)
    assert np.abs(theirs - ours).max() < 1e-3
    # Greedy: llama.cpp's own sampler with top_k=1 against model.generate at temperature 0.
    new = 16
    ours_greedy = run.model.generate(torch.tensor([ids]), new, temperature=0)[0, len(ids):].tolist()
    llm.reset()
    theirs_greedy = list(itertools.islice(llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0), new))
    assert theirs_greedy == ours_greedy
    assert len(set(ours_greedy)) > 2  # a real continuation, not one token repeated
    # f16 weights compute the same model, within f16's rounding.
    _, theirs_f16 = llama_logits(run.gguf("f16"), ids)
    assert np.abs(theirs_f16 - ours).max() < 2e-2


@pytest.mark.parametrize("outtype, ftype", [("f16", 1), ("bf16", 32), ("q8_0", 7)])
def test_outtypes_are_byte_for_byte_what_llama_cpp_quantize_writes(runs, tmp_path, outtype, ftype):
    """llama.cpp's own quantizer, from our f32 file, writes exactly the tensors we write."""
    require_llama_cpp()
    run = runs["bpe"]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    theirs_path = str(tmp_path / f"llama-{outtype}.gguf")
    assert llama_cpp.llama_model_quantize(run.gguf("f32").encode(), theirs_path.encode(), ctypes.byref(params)) == 0
    ours, theirs = tensors(gguf.GGUFReader(run.gguf(outtype))), tensors(gguf.GGUFReader(theirs_path))
    assert set(ours) == set(theirs)
    for tensor_name, t in ours.items():
        assert t.tensor_type == theirs[tensor_name].tensor_type, tensor_name
        assert np.asarray(t.data).tobytes() == np.asarray(theirs[tensor_name].data).tobytes(), tensor_name


# ----------------------------------------------------------------------------- chat models


@pytest.fixture(scope="module")
def sp_chat_run(tmp_path_factory) -> str:
    """A tiny model trained on conftest's copy-task conversations with an sp:N tokenizer (the
    default, its chat tokens control pieces): its out_dir."""
    root = tmp_path_factory.mktemp("sp-chat")
    write_copy_conversations(root / "chats.jsonl", 3000, seed=0)
    assert prepare.main(["--input", str(root / "chats.jsonl"), "--tokenizer", "sp:300", "--out_dir", str(root / "data"),
                         "--val_fraction", "0.05", "--workers", "1", "--no_progress", "--block_size", "80"]) == 0
    train.main([*CHAT_TINY, f"--data_dir={root / 'data'}", f"--out_dir={root / 'out'}", "--max_iters=400", "--eval_interval=400"])
    return str(root / "out")


def test_a_chat_models_gguf_chats_in_llama_cpp_as_sample_py_does(sp_chat_run, tmp_path):
    """A model trained on conversations (conftest's copy task) carries ChatML as
    tokenizer.chat_template and <|im_end|> as eos and end of turn: the prompt llama.cpp builds
    from the GGUF's own template is sample.py --chat's, token for token, and llama.cpp's greedy
    reply is sample.py's, ending at <|im_end|>. The Modelfile chats too."""
    dest = tmp_path / "chat.gguf"
    export_hf.main(["--out_dir", sp_chat_run, "--gguf", str(dest), "--outtype", "f32"])
    ckpt_path = os.path.join(sp_chat_run, "ckpt.pt")
    ckpt = load_checkpoint(ckpt_path)
    tok = load_checkpoint_tokenizer(ckpt, ckpt_path)
    im_end = ckpt["tokenizer"]["chat_tokens"]["<|im_end|>"]
    reader = gguf.GGUFReader(dest)
    assert field(reader, "tokenizer.chat_template") == toklib.CHATML_TEMPLATE
    assert field(reader, "tokenizer.ggml.eos_token_id") == field(reader, "tokenizer.ggml.eot_token_id") == im_end
    modelfile = (tmp_path / "Modelfile").read_text(encoding="utf-8")
    assert 'PARAMETER stop "<|im_end|>"' in modelfile.splitlines()
    assert ('TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"""'
            in modelfile)

    require_llama_cpp()  # the file's fields are checked above without it
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = llama_cpp.Llama(str(dest), n_ctx=256, n_threads=2, verbose=False)
    assert llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm._model.model), im_end)
    chat_format = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="<|im_end|>", bos_token="")
    rng = random.Random(123)  # messages the model never saw
    for i in range(3):
        message, word = copy_conversation(rng)
        messages = ([{"role": "system", "content": "copy"}] if i == 0 else []) + [{"role": "user", "content": message}]
        ours, _ = toklib.chat_ids(tok, messages, add_generation_prompt=True)
        prompt = chat_format(messages=messages).prompt
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ours
        # llama.cpp's own chat path: it reads the template from the GGUF and stops at <|im_end|>.
        llm.reset()
        theirs = llm.create_chat_completion(messages, temperature=0.0, top_k=1, repeat_penalty=1.0, max_tokens=30)["choices"][0]
        system = ["--system", "copy"] if i == 0 else []
        cli = subprocess.run([sys.executable, "sample.py", "--out_dir", sp_chat_run, "--chat", *system, "--start", message, "--temperature", "0",
                              "--dtype", "float32", "--max_new_tokens", "30"], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert cli.returncode == 0, cli.stderr
        assert theirs["message"]["content"] == cli.stdout.rstrip("\n") == word and theirs["finish_reason"] == "stop"
        # ... and the token llama.cpp stopped at is <|im_end|> itself.
        llm.reset()
        reply = list(itertools.islice(llm.generate(ours, top_k=1, temp=0.0, repeat_penalty=1.0), 30))
        assert tok.decode(reply[: reply.index(im_end)]) == word


def test_a_base_models_gguf_has_no_chat_template(runs):
    """The sp:N base model's tokenizer reserves the chat tokens, but it was trained on text: its
    GGUF and Modelfile continue text, ending at end-of-text."""
    run = runs["sp"]
    assert run.info.get("chat_tokens")
    reader = gguf.GGUFReader(run.gguf("f16"))
    assert "tokenizer.chat_template" not in reader.fields and "tokenizer.ggml.eot_token_id" not in reader.fields
    assert field(reader, "tokenizer.ggml.eos_token_id") == run.info["eot_id"]
    assert "PARAMETER stop" not in open(os.path.join(run.out_dir, "export", "Modelfile"), encoding="utf-8").read()
