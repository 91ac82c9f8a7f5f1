"""export_hf.py against transformers itself: exported models and tokenizers must load with
AutoModelForCausalLM/AutoTokenizer and agree with ours; imported HF models must agree with theirs."""

import json
import os
import random
import shutil
import unicodedata

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for the hub: every model here is a local directory
os.environ["TRANSFORMERS_VERBOSITY"] = "error"

import regex  # noqa: E402  (tiktoken's dependency)
import sentencepiece as spm  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402

import dataset  # noqa: E402
import export_hf  # noqa: E402
import hf as hflib  # noqa: E402  (tests below use `hf` for a transformers model)
import prepare  # noqa: E402
import tokenizer as toklib  # noqa: E402  (tests below use `tokenizer` for a parameter)
from conftest import learn_bpe_ranks  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402

torch.set_num_threads(2)

LATIN = "The quick brown fox jumps over the lazy dog, 12345 times."
CYRILLIC = "Съешь же ещё этих мягких французских булок, да выпей чаю."
# Tokenizer probes: Cyrillic with ё/Ё, long digit runs, space runs, tabs, CRLF, non-breaking and
# ideographic spaces, a combining accent, emoji and CJK (byte fallback for SentencePiece).
PROBES = [
    CYRILLIC,
    LATIN,
    "Ёлка в 2024 году стоила 123456789 рублей!!!",
    "  отступ,\tтаб и  двойной   пробел  ",
    "строка\r\nещё строка\n\n\nконец   \n",
    "нераз\u00a0рывный и\u3000широкий\u2009тонкий",
    "и\u0306 (й из двух символов) 😀 中文 ü",
    "def f(x):\n    return x  # комментарий",
    "",
]
CORPUS_SENTENCES = [
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "В чащах юга жил бы цитрус? Да, но фальшивый экземпляр!",
    "Широкая электрификация южных губерний даст мощный толчок подъёму сельского хозяйства.",
    "Москва — столица России, а Санкт-Петербург — северная столица.",
    "Мы учим маленькую модель говорить по-русски и немного по-английски.",
    "The quick brown fox jumps over the lazy dog.",
    "Pack my box with five dozen liquor jugs.",
    "В 1961 году Гагарин полетел в космос, а в 1969 году люди были на Луне.",
    "def main():\n    print('привет, мир')\n    return 0",
]


def corpus(lines: int = 1500, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = " ".join(CORPUS_SENTENCES).split(" ")
    docs = list(CORPUS_SENTENCES)
    for _ in range(lines):
        docs.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))))
    return docs


def byte_level_bpe(vocab_size: int, special_tokens: list[str], hf_dir: str | None = None):
    """A byte-level BPE (GPT-2's pre-tokenizer) trained by the tokenizers library on corpus(), as
    many HF models ship theirs; with hf_dir, saved there with <|endoftext|> as eos_token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    if hf_dir:
        tok.save(os.path.join(hf_dir, "tokenizer.json"))
        with open(os.path.join(hf_dir, "tokenizer_config.json"), "w") as f:
            json.dump({"eos_token": "<|endoftext|>"}, f)
    return tok


# ----------------------------------------------------------------------------- tokenizers


def train_sentencepiece(dest: str, kind: str) -> dict:
    """A tokenizer.model in dest, as prepare.py trains it ("prepare": byte-fallback BPE, identity
    normalization) or with SentencePiece's defaults ("unigram": NFKC, dummy prefix, collapsed
    spaces), and its meta["tokenizer"] record."""
    path = os.path.join(dest, "tokenizer.model")
    if kind == "prepare":
        toklib.train_sentencepiece(corpus(), 420, path)
    else:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus()), model_prefix=path[: -len(".model")], vocab_size=420,
            model_type="unigram", byte_fallback=True, hard_vocab_limit=False, num_threads=2, minloglevel=2,
        )
    sp = spm.SentencePieceProcessor(model_file=path)
    return dict(kind="sentencepiece", spec="test", file="tokenizer.model", name=None, pat_str=None,
                special_tokens={}, eot_id=sp.eos_id(), bos_id=sp.bos_id() if sp.bos_id() >= 0 else None)


def train_tiktoken(dest: str, pat_str: str = toklib.DEFAULT_TIKTOKEN_PATTERN, merges: int = 200) -> dict:
    """A small byte-level BPE learned on the corpus (see learn_bpe_ranks) plus <|endoftext|>,
    saved as tokenizer.tiktoken."""
    ranks = learn_bpe_ranks(corpus(), pat_str, merges)
    toklib.write_tiktoken_ranks(ranks, os.path.join(dest, "tokenizer.tiktoken"))
    eot = len(ranks)
    return dict(kind="tiktoken", spec="test", file="tokenizer.tiktoken", name=None, pat_str=pat_str,
                special_tokens={"<|endoftext|>": eot}, eot_id=eot, bos_id=None)


TOKENIZERS = {"sp-prepare": lambda d: train_sentencepiece(d, "prepare"), "sp-unigram": lambda d: train_sentencepiece(d, "unigram"),
              "tiktoken": train_tiktoken, "tiktoken-qwen": lambda d: train_tiktoken(d, toklib.QWEN2_PAT_STR)}


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory) -> dict:
    """Each tokenizer trained once per module: {name: (directory, meta record)}."""
    dirs = {}
    for name, make in TOKENIZERS.items():
        d = str(tmp_path_factory.mktemp(name))
        dirs[name] = (d, make(d))
    return dirs


# ----------------------------------------------------------------------------- checkpoints


def randomize_(model: torch.nn.Module, o_proj_bias: float = 0.0) -> None:
    """Non-trivial norm gains, non-zero biases and random weights, so that a swapped or dropped
    tensor shows up in the logits. An o_proj bias (HF Llama with attention_bias) is set to
    o_proj_bias instead."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("o_proj.bias"):
                p.fill_(o_proj_bias)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 0.08)


def random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    randomize_(model)
    return model


def save_checkpoint(model: Transformer, info: dict, tok_dir: str, out_dir: str) -> str:
    """ckpt.pt in train.py's format, with the tokenizer file copied beside it."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "ckpt.pt")
    torch.save({"model": model.state_dict(), "model_config": model.config.to_dict(), "train_config": {},
                "tokenizer": info, "step": 7, "tokens_seen": 0}, path)
    shutil.copyfile(os.path.join(tok_dir, info["file"]), os.path.join(out_dir, info["file"]))
    return path


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def our_logits(model: Transformer, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize(
    "architecture, tokenizer, overrides",
    [
        ("LlamaForCausalLM", "sp-prepare", dict(qkv_bias=False, tie_embeddings=True, n_kv_head=2)),
        ("Qwen2ForCausalLM", "tiktoken-qwen", dict(qkv_bias=True, tie_embeddings=False, n_kv_head=1)),
        ("LlamaForCausalLM", "tiktoken", dict(qkv_bias=True, tie_embeddings=True, n_kv_head=2)),  # attention_bias
        ("LlamaForCausalLM", "sp-unigram", dict(qkv_bias=False, tie_embeddings=False, n_kv_head=4)),
    ],
)
def test_export_loads_in_transformers_with_equal_logits(tmp_path, tokenizer_dirs, architecture, tokenizer, overrides):
    tok_dir, info = tokenizer_dirs[tokenizer]
    ours_tok = toklib.load_tokenizer(info, tok_dir)
    # vocab padded past the tokenizer's; non-default widths, theta and eps so each must map.
    cfg = ModelConfig(vocab_size=ours_tok.vocab_size + 13, n_layer=2, n_head=4, n_embd=64, ffn_hidden=96,
                      max_seq_len=128, rope_theta=5000.0, norm_eps=1e-5, **overrides)
    model = random_model(cfg)
    ckpt = save_checkpoint(model, info, tok_dir, str(tmp_path / "out"))
    dest = str(tmp_path / "hf")
    export_hf.main(["--ckpt", ckpt, "--to", dest])

    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == [architecture]
    assert config["vocab_size"] == cfg.vocab_size and config["eos_token_id"] == info["eot_id"]
    with safe_open(os.path.join(dest, "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not cfg.tie_embeddings)

    hf = transformers.AutoModelForCausalLM.from_pretrained(dest).eval()
    assert type(hf).__name__ == config["architectures"][0]
    assert hf.dtype == torch.float32
    for text in (LATIN, CYRILLIC):
        ids = ours_tok.encode(text)
        assert len(ids) > 5
        torch.testing.assert_close(hf_logits(hf, ids), our_logits(model, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tokenizer, qkv_bias", [(name, False) for name in sorted(TOKENIZERS)] + [("sp-prepare", True), ("tiktoken-qwen", True)])
def test_exported_tokenizer_encodes_and_decodes_like_ours(tmp_path, tokenizer_dirs, tokenizer, qkv_bias):
    tok_dir, info = tokenizer_dirs[tokenizer]
    ours = toklib.load_tokenizer(info, tok_dir)
    cfg = ModelConfig(vocab_size=ours.vocab_size, n_layer=1, n_head=2, n_embd=16, ffn_hidden=32, max_seq_len=256, qkv_bias=qkv_bias)
    dest = str(tmp_path / "hf")
    export_hf.main(["--ckpt", save_checkpoint(random_model(cfg), info, tok_dir, str(tmp_path / "out")), "--to", dest])

    theirs = transformers.AutoTokenizer.from_pretrained(dest)
    assert theirs.eos_token_id == info["eot_id"]
    assert theirs.bos_token_id == info["bos_id"]
    if info["kind"] == "sentencepiece":  # llama.cpp's converter assumes a dummy-prefix space when the key is missing
        tokenizer_config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
        assert tokenizer_config["add_prefix_space"] is (tokenizer == "sp-unigram")
    qwen = json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "qwen2"
    assert qwen == (tokenizer == "tiktoken-qwen" and qkv_bias)
    for text in PROBES + corpus(300, seed=5)[-300:]:
        if qwen:  # transformers 5 loads it as Qwen2Tokenizer, which NFC-normalizes like Qwen's own
            text = unicodedata.normalize("NFC", text)
        ids = ours.encode(text)
        assert theirs(text)["input_ids"] == ids, text  # default call: no BOS/EOS added either
        assert theirs.decode(ids) == ours.decode(ids), text
    if info["kind"] == "tiktoken":
        # The regex split itself, which the probes above may not expose (digit runs of 4+ stay
        # together if the tokenizers engine reads \p{N}{1,3}+ as (\p{N}{1,3})+).
        char_byte = {c: b for b, c in toklib.bytes_to_unicode().items()}
        for text in PROBES + ["1234567 год", "конец  "]:
            pieces = theirs.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)
            assert [bytes(char_byte[c] for c in p).decode() for p, _ in pieces] == regex.findall(info["pat_str"], text), text


@pytest.mark.parametrize("placement", ["first", "last", "gap"])
def test_exported_bpe_special_tokens_keep_their_true_ids(tmp_path, placement):
    """<|endoftext|> first (GPT-2 style tokenizers imported with hf:), last (prepare.py's bare
    .tiktoken) or inside the id range next to an id no token has (cl100k): transformers must
    see it at its own id, and the real token at the next free id must stay a real token."""
    learned = learn_bpe_ranks(corpus(300), toklib.DEFAULT_TIKTOKEN_PATTERN, 100)
    if placement == "first":
        ranks, special = {t: r + 1 for t, r in learned.items()}, {"<|endoftext|>": 0}
    elif placement == "last":
        ranks, special = learned, {"<|endoftext|>": len(learned)}
    else:  # 300 is <|endoftext|>, 301 nobody's, the ranks from 300 up move by 2
        ranks, special = {t: r + 2 if r >= 300 else r for t, r in learned.items()}, {"<|endoftext|>": 300}
    eot = special["<|endoftext|>"]
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    toklib.write_tiktoken_ranks(ranks, str(tok_dir / "tokenizer.tiktoken"))
    info = dict(kind="tiktoken", spec="test", file="tokenizer.tiktoken", name=None, pat_str=toklib.DEFAULT_TIKTOKEN_PATTERN,
                special_tokens=special, eot_id=eot, bos_id=None)
    ours = toklib.load_tokenizer(info, str(tok_dir))
    cfg = ModelConfig(vocab_size=ours.vocab_size, n_layer=1, n_head=2, n_embd=16, ffn_hidden=32, max_seq_len=64)
    dest = str(tmp_path / "hf")
    export_hf.main(["--ckpt", save_checkpoint(random_model(cfg), info, str(tok_dir), str(tmp_path / "out")), "--to", dest])

    theirs = transformers.AutoTokenizer.from_pretrained(dest)
    assert theirs.eos_token_id == eot and theirs.convert_ids_to_tokens(eot) == "<|endoftext|>"
    last_rank = max(ranks.values())  # where `tokenizers` used to put an added token missing from the vocab
    assert theirs.convert_ids_to_tokens(last_rank) != "<|endoftext|>" and last_rank not in theirs.all_special_ids
    for text in PROBES:
        ids = ours.encode(text)
        assert theirs(text)["input_ids"] == ids, text
        assert theirs.decode(ids) == ours.decode(ids), text
    assert theirs.decode([ours.encode("мир")[0], eot]) == ours.decode([ours.encode("мир")[0], eot])


def test_export_refuses_to_overwrite_and_reports_missing_checkpoint(tmp_path, tokenizer_dirs, capsys):
    tok_dir, info = tokenizer_dirs["tiktoken"]
    model = random_model(ModelConfig(vocab_size=info["eot_id"] + 1, n_layer=1, n_head=2, n_embd=16, ffn_hidden=32, max_seq_len=32))
    ckpt = save_checkpoint(model, info, tok_dir, str(tmp_path / "out"))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model-00001-of-00002.safetensors").write_text("stale")
    with pytest.raises(SystemExit) as exit_info:
        export_hf.main(["--ckpt", ckpt, "--to", str(tmp_path / "hf")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "--overwrite" in err and err.count("\n") == 1
    export_hf.main(["--ckpt", ckpt, "--to", str(tmp_path / "hf"), "--overwrite", "--dtype", "bfloat16"])
    assert not (tmp_path / "hf" / "model-00001-of-00002.safetensors").exists()  # a stale shard would shadow ours
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    with pytest.raises(SystemExit):
        export_hf.main(["--out_dir", str(tmp_path / "nowhere"), "--to", str(tmp_path / "hf2")])
    assert "no checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --to the training out_dir would clobber train.py's config.json
        export_hf.main(["--ckpt", ckpt, "--to", str(tmp_path / "out"), "--overwrite"])
    assert "holds a training checkpoint" in capsys.readouterr().err


def test_onig_pattern_keeps_tiktoken_semantics():
    assert toklib.onig_pattern(r"\p{N}{1,3}+|\s++$") == r"(?>\p{N}{1,3})|\s++\z"
    assert toklib.onig_pattern(r"[^\r\n\p{L}\p{N}]?+[$^]{2}+|^a") == r"[^\r\n\p{L}\p{N}]?+(?>[$^]{2})|\Aa"
    with pytest.raises(toklib.TokenizerError, match="possessive"):
        toklib.onig_pattern(r"(ab){2}+")


# ----------------------------------------------------------------------------- import


def tiny_hf_model(tmp_path, model_type: str, tie: bool, attention_bias: bool = False, o_bias: float = 0.0, storage: str = "single",
                  vocab_size: int = 320):
    """A random transformers Llama/Qwen2 (GQA) saved with save_pretrained, as downloaded models are.
    attention_bias: a Llama whose o_proj bias is filled with o_bias. storage: one model.safetensors,
    "sharded" safetensors with an index, or an old-style pytorch_model.bin."""
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=tie,
                  bos_token_id=None, eos_token_id=None)
    if model_type == "llama":
        config = transformers.LlamaConfig(rope_theta=20000.0, attention_bias=attention_bias, **common)
        cls = transformers.LlamaForCausalLM
    else:
        config = transformers.Qwen2Config(rope_theta=20000.0, **common)
        cls = transformers.Qwen2ForCausalLM
    torch.manual_seed(0)
    hf = cls(config).eval()
    randomize_(hf, o_proj_bias=o_bias)
    path = str(tmp_path / f"hf-{model_type}")
    hf.save_pretrained(path, max_shard_size="100KB" if storage == "sharded" else "5GB")
    if storage == "bin":
        from safetensors.torch import load_file

        torch.save(load_file(os.path.join(path, "model.safetensors")), os.path.join(path, "pytorch_model.bin"))
        os.remove(os.path.join(path, "model.safetensors"))
    return hf, path


@pytest.mark.parametrize(
    "model_type, tie, attention_bias, storage",
    [("llama", False, False, "sharded"), ("qwen2", True, False, "single"), ("llama", True, True, "bin")],
)
def test_import_matches_transformers_logits_and_greedy_generation(tmp_path, model_type, tie, attention_bias, storage):
    hf, path = tiny_hf_model(tmp_path, model_type, tie, attention_bias, storage=storage)
    assert os.path.exists(os.path.join(path, {"single": "model.safetensors", "sharded": "model.safetensors.index.json",
                                              "bin": "pytorch_model.bin"}[storage]))
    cfg, state = hflib.load_hf_model(path)
    qkv_bias = model_type == "qwen2" or attention_bias
    assert (cfg.qkv_bias, cfg.tie_embeddings, cfg.n_kv_head, cfg.rope_theta) == (qkv_bias, tie, 2, 20000.0)
    assert (state["lm_head.weight"] is state["embed.weight"]) == tie
    model = Transformer(cfg).eval()
    model.load_state_dict(state, strict=True)

    ids = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0)).tolist()[0]
    torch.testing.assert_close(our_logits(model, ids), hf_logits(hf, ids), atol=1e-4, rtol=1e-4)
    prompt = torch.tensor([ids])
    ours = model.generate(prompt, 20, temperature=0)
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=20,
                         min_new_tokens=20, eos_token_id=None, pad_token_id=0)
    assert ours.tolist() == theirs.tolist()


def test_import_cli_writes_a_checkpoint_with_the_converted_tokenizer(tmp_path, tokenizer_dirs):
    """HF dir (model + a tokenizer.json we exported from tiktoken) -> ckpt.pt + tokenizer.tiktoken
    whose ranks, specials and pattern are the originals: the tokenizer survives the round trip."""
    tok_dir, info = tokenizer_dirs["tiktoken"]
    ours_tok = toklib.load_tokenizer(info, tok_dir)
    cfg = ModelConfig(vocab_size=ours_tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, ffn_hidden=96,
                      max_seq_len=64, qkv_bias=True, tie_embeddings=True)
    model = random_model(cfg)
    hf_dir, out = str(tmp_path / "hf"), str(tmp_path / "imported")
    export_hf.main(["--ckpt", save_checkpoint(model, info, tok_dir, str(tmp_path / "out")), "--to", hf_dir])
    export_hf.main(["--import_from", hf_dir, "--to", out])

    ckpt = torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=True)
    assert (ckpt["step"], ckpt["tokens_seen"], ckpt["train_config"]) == (0, 0, {})
    assert ModelConfig.from_dict(ckpt["model_config"]) == cfg
    back = Transformer(cfg).eval()
    back.load_state_dict(ckpt["model"], strict=True)
    ids = ours_tok.encode(CYRILLIC)
    torch.testing.assert_close(our_logits(back, ids), our_logits(model, ids), atol=0, rtol=0)

    record = ckpt["tokenizer"]
    assert {k: record[k] for k in ("kind", "file", "eot_id", "bos_id", "special_tokens")} == {
        k: info[k] for k in ("kind", "file", "eot_id", "bos_id", "special_tokens")}
    assert toklib.read_tiktoken_ranks(os.path.join(out, "tokenizer.tiktoken")) == toklib.read_tiktoken_ranks(
        os.path.join(tok_dir, "tokenizer.tiktoken"))
    imported = toklib.load_tokenizer(record, out)
    for text in PROBES:
        assert imported.encode(text) == ours_tok.encode(text), text


def test_import_sentencepiece_tokenizer_is_copied(tmp_path, tokenizer_dirs):
    tok_dir, info = tokenizer_dirs["sp-prepare"]
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    shutil.copyfile(os.path.join(tok_dir, "tokenizer.model"), hf_dir / "tokenizer.model")
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": None}))
    record = toklib.import_hf_tokenizer(str(hf_dir), str(tmp_path / "out"))
    assert record["kind"] == "sentencepiece" and record["eot_id"] == info["eot_id"] and record["bos_id"] is None
    ours, imported = toklib.load_tokenizer(info, tok_dir), toklib.load_tokenizer(record, str(tmp_path / "out"))
    assert imported.encode(CYRILLIC) == ours.encode(CYRILLIC)


def test_import_gpt2_style_tokenizer_json_made_by_tokenizers(tmp_path):
    """A byte-level BPE trained by the tokenizers library itself (ByteLevel pre-tokenizer, GPT-2's
    regex) converts to a tiktoken encoding that splits text identically."""
    tok = byte_level_bpe(400, ["<|endoftext|>"])
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    tok.save(str(hf_dir / "tokenizer.json"))
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    record = toklib.import_hf_tokenizer(str(hf_dir), str(tmp_path / "out"))
    assert record["eot_id"] == tok.token_to_id("<|endoftext|>") and record["special_tokens"] == {"<|endoftext|>": 0}
    imported = toklib.load_tokenizer(record, str(tmp_path / "out"))
    for text in PROBES:
        assert imported.encode(text) == tok.encode(text).ids, text


def test_continue_pretraining_a_hf_model_prepare_then_train(tmp_path):
    """The README's flow: prepare --tokenizer hf:DIR tokenizes exactly as the HF tokenizer does,
    and train.py --init_from=hf:DIR starts from the HF weights (its first loss equals the loss
    transformers computes on the same window)."""

    import train

    hf, hf_dir = tiny_hf_model(tmp_path, "qwen2", tie=True)
    tok = byte_level_bpe(300, ["<|endoftext|>"], hf_dir)
    docs = corpus(200, seed=1)
    (tmp_path / "ru.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    data = tmp_path / "data"
    assert prepare.main(["--input", str(tmp_path / "ru.jsonl"), "--tokenizer", f"hf:{hf_dir}", "--out_dir", str(data),
                         "--val_input", str(tmp_path / "ru.jsonl"), "--workers", "1", "--no_progress"]) == 0
    meta = dataset.load_meta(str(data))
    eot = tok.token_to_id("<|endoftext|>")
    assert meta["eot_id"] == eot and meta["tokenizer"]["spec"] == f"hf:{hf_dir}"
    expected = [i for doc in docs for i in (*tok.encode(doc).ids, eot)]
    assert np.fromfile(data / "val_000000.bin", dtype=meta["dtype"]).tolist() == expected

    out = tmp_path / "out"
    train.main([f"--data_dir={data}", f"--out_dir={out}", f"--init_from=hf:{hf_dir}", "--block_size=32", "--batch_size=2",
                "--max_iters=1", "--eval_interval=1", "--eval_iters=1", "--log_interval=1", "--learning_rate=1e-4",
                "--device=cpu", "--compile=False", "--dtype=float32"])  # compared with HF's fp32 loss
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    picks = train.TokenShards(str(data), meta, "train", 32).sample([1337, 0], 2)
    x, y = train.TokenShards(str(data), meta, "train", 32).read(picks, torch.device("cpu"))
    with torch.no_grad():
        hf_loss = torch.nn.functional.cross_entropy(hf(x).logits.flatten(0, 1), y.flatten()).item()
    assert first["loss"] == pytest.approx(hf_loss, rel=1e-5)


def test_sft_from_a_hf_model_grows_its_vocabulary_for_the_appended_chat_tokens(tmp_path, capsys):
    """A HF model whose tokenizer has no chat tokens and no spare rows (vocab_size = the
    tokenizer's size, as in most Llamas): prepare.py appends <|im_start|>/<|im_end|> to the
    tokenizer for conversations, and train.py --init_from=hf:DIR grows the embedding and the
    output head to match (new rows: the mean of the old), saying so, instead of refusing."""

    import train

    size = 300
    hf, hf_dir = tiny_hf_model(tmp_path, "llama", tie=False, vocab_size=size)
    assert byte_level_bpe(size, ["<|endoftext|>"], hf_dir).get_vocab_size() == size
    chats = [{"messages": [{"role": "user", "content": d[:40]}, {"role": "assistant", "content": d[40:80] or "да"}]} for d in corpus(300, seed=2)]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in chats), encoding="utf-8")
    data = tmp_path / "data"
    assert prepare.main(["--input", str(tmp_path / "chats.jsonl"), "--tokenizer", f"hf:{hf_dir}", "--out_dir", str(data),
                         "--workers", "1", "--no_progress", "--block_size", "64"]) == 0
    meta = dataset.load_meta(str(data))
    assert meta["vocab_size"] == size + 2 and meta["tokenizer"]["chat_tokens"] == {"<|im_start|>": size, "<|im_end|>": size + 1}

    out = tmp_path / "out"
    capsys.readouterr()
    train.main([f"--data_dir={data}", f"--out_dir={out}", f"--init_from=hf:{hf_dir}", "--block_size=64", "--batch_size=2",
                "--max_iters=1", "--eval_interval=1", "--eval_iters=1", "--learning_rate=0", "--min_lr=0", "--warmup_iters=0",
                "--device=cpu", "--dtype=float32", "--compile=False"])
    assert f"grew the vocabulary from {size} to {size + 2} tokens" in capsys.readouterr().out
    grown = torch.load(out / "ckpt.pt", weights_only=True)
    assert grown["model_config"]["vocab_size"] == size + 2
    for ours, theirs in (("embed.weight", hf.model.embed_tokens.weight), ("lm_head.weight", hf.lm_head.weight)):
        assert torch.equal(grown["model"][ours][:size], theirs.detach())
        assert torch.allclose(grown["model"][ours][size:], theirs.detach().mean(0).expand(2, -1))


# ----------------------------------------------------------------------------- refusals


VALID_LLAMA = dict(model_type="llama", vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(model_type="qwen2", use_sliding_window=True, sliding_window=4096), "use_sliding_window"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling"),
        (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), "rope_parameters"),
        (dict(model_type="mistral"), "model_type"),
        (dict(mlp_bias=True), "mlp_bias"),
        (dict(head_dim=32), "head_dim"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(pretraining_tp=2), "pretraining_tp"),
        (dict(num_local_experts=8), "num_local_experts"),
    ],
)
def test_import_refuses_unsupported_features_naming_the_field(tmp_path, capsys, changes, field):
    (tmp_path / "config.json").write_text(json.dumps({**VALID_LLAMA, **changes}))
    with pytest.raises(hflib.HFError, match=rf"config\.json has {field}="):
        hflib.load_hf_model(str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        export_hf.main(["--import_from", str(tmp_path), "--to", str(tmp_path / "out")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: config.json has {field}=") and err.count("\n") == 1


def test_import_refuses_llama_with_a_nonzero_o_proj_bias(tmp_path):
    _, path = tiny_hf_model(tmp_path, "llama", tie=False, attention_bias=True, o_bias=0.5)
    with pytest.raises(hflib.HFError, match=r"attention_bias=true.*o_proj\.bias is non-zero"):
        hflib.load_hf_model(path)


# Qwen2.5-0.5B's config.json as published (written by transformers 4.x: rope_theta at the top,
# a sliding_window that use_sliding_window leaves off).
QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
    "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02, "intermediate_size": 4864,
    "max_position_embeddings": 32768, "max_window_layers": 24, "model_type": "qwen2", "num_attention_heads": 14,
    "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.40.1",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}


def test_import_reads_a_qwen25_config_and_reports_missing_weights(tmp_path):
    cfg = hflib.model_config_from_hf(QWEN25_05B)
    assert cfg == ModelConfig(vocab_size=151936, n_layer=24, n_head=14, n_kv_head=2, n_embd=896, ffn_hidden=4864,
                              max_seq_len=32768, rope_theta=1e6, norm_eps=1e-6, tie_embeddings=True, qkv_bias=True)
    llama = {**VALID_LLAMA, "rope_scaling": {"rope_type": "default"}, "rope_theta": 5e5}
    assert hflib.model_config_from_hf(llama).rope_theta == 5e5
    (tmp_path / "config.json").write_text(json.dumps(QWEN25_05B))
    with pytest.raises(hflib.HFError, match="no weights"):
        hflib.load_hf_model(str(tmp_path))


# ----------------------------------------------------------------------------- chat


CHATS = [
    [{"role": "user", "content": CYRILLIC}],
    [{"role": "system", "content": "Отвечай кратко."}, {"role": "user", "content": "Привет!"},
     {"role": "assistant", "content": "Здравствуйте! Чем помочь?"}, {"role": "user", "content": LATIN + "\n  и ещё  строка"}],
]


def chat_ready(name: str, tokenizer_dirs, tmp_path) -> tuple[str, dict]:
    """A copy of tokenizer_dirs[name] whose record has the chat tokens, as prepare.py makes it:
    sp-prepare reserves them already, the others get them appended."""
    src, info = tokenizer_dirs[name]
    dest = str(tmp_path / f"tok-{name}")
    shutil.copytree(src, dest)
    info, _ = toklib.add_chat_tokens(toklib.with_chat_tokens(info, toklib.load_tokenizer(info, dest)), dest)
    return dest, info


@pytest.mark.parametrize("tokenizer", ["sp-prepare", "sp-unigram", "tiktoken", "tiktoken-qwen"])
def test_exported_chat_template_gives_the_ids_of_chat_ids(tmp_path, tokenizer_dirs, tokenizer):
    tok_dir, info = chat_ready(tokenizer, tokenizer_dirs, tmp_path)
    ours = toklib.load_tokenizer(info, tok_dir)
    assert (ours.im_start_id, ours.im_end_id) == ((2, 3) if tokenizer == "sp-prepare" else (ours.vocab_size - 2, ours.vocab_size - 1))
    cfg = ModelConfig(vocab_size=ours.vocab_size, n_layer=1, n_head=2, n_embd=16, ffn_hidden=32, max_seq_len=256)
    dest = str(tmp_path / "hf")
    export_hf.main(["--ckpt", save_checkpoint(random_model(cfg), info, tok_dir, str(tmp_path / "out")), "--to", dest])
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["chat_template"] == toklib.CHATML_TEMPLATE
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [ours.im_end_id, info["eot_id"]]
    theirs = transformers.AutoTokenizer.from_pretrained(dest)
    for messages in CHATS:
        for prompt in (False, True):
            ids = theirs.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True, return_dict=False)
            assert ids == toklib.chat_ids(ours, messages, add_generation_prompt=prompt)[0]


def test_transformers_chat_template_and_generate_equal_sample_chat_token_for_token(tmp_path, chat_run):
    import subprocess
    import sys

    import sample
    from checkpoint import find_checkpoint, load_checkpoint, load_checkpoint_tokenizer, model_from_checkpoint

    dest = str(tmp_path / "hf")
    export_hf.main(["--out_dir", chat_run, "--to", dest])
    hf = transformers.AutoModelForCausalLM.from_pretrained(dest).eval()
    theirs = transformers.AutoTokenizer.from_pretrained(dest)
    path = find_checkpoint(chat_run)
    ckpt = load_checkpoint(path)
    model, tok = model_from_checkpoint(ckpt, "cpu", torch.float32), load_checkpoint_tokenizer(ckpt, path)
    for message in ["abc [honey] xyz", "q [cloud] w e r t y", "[brick]", "привет [grape] мир"]:
        messages = [{"role": "user", "content": message}]
        prompt = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert prompt == toklib.chat_ids(tok, messages, add_generation_prompt=True)[0]
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), do_sample=False,
                              max_new_tokens=30, pad_token_id=tok.eot_id)[0, len(prompt):].tolist()
        assert out[-1] == tok.im_end_id  # stopped at the end of the turn, by generation_config.json
        ids, text, reason = sample.stream_sample(model, tok, prompt, lambda s: None, 30, temperature=0.0,
                                                 eos_ids=[tok.im_end_id, tok.eot_id])
        assert ids == out[:-1] and reason == "eos"
        cli = subprocess.run([sys.executable, "sample.py", "--out_dir", chat_run, "--chat", "--start", message, "--temperature", "0",
                              "--dtype", "float32", "--max_new_tokens", "30"], cwd=os.path.dirname(hflib.__file__), capture_output=True)
        assert cli.stdout.decode("utf-8") == theirs.decode(out, skip_special_tokens=True) + "\n" == text + "\n"


def test_importing_a_chat_model_keeps_it_chat_capable(tmp_path):
    """A HF model whose tokenizer has Qwen's <|im_start|>/<|im_end|> imports with those ids as
    its chat tokens: sample.py --chat works on it, and exporting it again writes the template."""
    import subprocess
    import sys

    _, hf_dir = tiny_hf_model(tmp_path, "llama", tie=True)
    byte_level_bpe(300, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], hf_dir)
    out = str(tmp_path / "imported")
    export_hf.main(["--import_from", hf_dir, "--to", out])
    record = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["tokenizer"]
    assert record["chat_tokens"] == {"<|im_start|>": 1, "<|im_end|>": 2}
    chat = subprocess.run([sys.executable, "sample.py", "--out_dir", out, "--chat", "--start", "Привет", "--max_new_tokens", "4",
                           "--seed", "1"], cwd=os.path.dirname(hflib.__file__), capture_output=True)
    assert chat.returncode == 0, chat.stderr.decode()
    export_hf.main(["--out_dir", out, "--to", str(tmp_path / "again")])
    assert json.loads((tmp_path / "again" / "tokenizer_config.json").read_text())["chat_template"] == toklib.CHATML_TEMPLATE
