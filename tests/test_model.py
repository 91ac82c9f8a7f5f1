import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import hardware
import model
from model import ModelConfig, Transformer, apply_rope, count_params, flops_per_token, sample_next_token

torch.set_num_threads(2)


def tiny(**overrides) -> ModelConfig:
    values = dict(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, max_seq_len=64)
    values.update(overrides)
    return ModelConfig(**values)


def build(seed=0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny(**overrides)).eval()


# ----------------------------------------------------------------------------- config


def test_config_derives_llama_ffn_width_and_mha_default():
    assert model.default_ffn_hidden(4096) == 11008  # Llama-7B
    assert model.default_ffn_hidden(512) == 1536
    assert ModelConfig(n_embd=768, n_head=12).ffn_hidden == 2048
    assert ModelConfig(n_embd=768, n_head=12).n_kv_head == 12
    assert ModelConfig(n_embd=768, n_head=12, ffn_hidden=1000).ffn_hidden == 1000


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(n_embd=30, n_head=4), "n_embd=30 is not divisible by n_head=4"),
        (dict(n_head=4, n_kv_head=3), "n_head=4 is not divisible by n_kv_head=3"),
        (dict(n_embd=36, n_head=12, n_kv_head=12), "head_dim = n_embd/n_head = 3 is odd"),
        (dict(n_layer=0), "n_layer=0 must be a positive integer"),
        (dict(vocab_size=-5), "vocab_size=-5 must be a positive integer"),
        (dict(dropout=1.5), "dropout=1.5 must be in [0, 1)"),
    ],
)
def test_config_rejects_bad_values_with_the_fix(overrides, message):
    with pytest.raises(ValueError) as err:
        tiny(**overrides)
    assert message in str(err.value)


def test_config_error_suggests_a_divisor():
    with pytest.raises(ValueError, match=r"e\.g\. 5\)"):
        tiny(n_embd=40, n_head=6)
    # Found among the divisor pairs (d, n/d), d <= sqrt(n): a 13-digit n_embd answers at once
    # (issue 21 H6: every d up to n took 6 s for n_embd=100000001).
    with pytest.raises(ValueError, match=r"e\.g\. 1000003\)"):
        tiny(n_embd=1000003 * 999983, n_head=1000000)
    with pytest.raises(ValueError, match=r"e\.g\. 999983\)"):
        tiny(n_embd=1000003 * 999983, n_head=999990)


def test_config_round_trips_through_dict():
    cfg = tiny(qkv_bias=True, tie_embeddings=False)
    assert ModelConfig.from_dict({**cfg.to_dict(), "learning_rate": 1e-3}) == cfg


# ----------------------------------------------------------------------------- forward


def test_forward_shapes_and_loss_ignores_minus_one():
    m = build()
    idx = torch.randint(0, 97, (3, 10))
    targets = torch.randint(0, 97, (3, 10))
    logits, loss = m(idx), m(idx, targets)
    assert logits.shape == (3, 10, 97) and loss.shape == ()
    expected = F.cross_entropy(logits.view(-1, 97), targets.view(-1))
    assert torch.allclose(loss, expected)
    targets[:, :5] = -1
    loss_masked = m(idx, targets)
    expected_masked = F.cross_entropy(logits[:, 5:].reshape(-1, 97), targets[:, 5:].reshape(-1))
    assert torch.allclose(loss_masked, expected_masked)


@pytest.mark.parametrize("tie", [True, False])
def test_chunked_loss_equals_the_plain_loss_and_gradients(monkeypatch, tie):
    # Several chunks (5 tokens each), ignored targets, tied or untied head: the loss and every
    # gradient must equal plain autograd through full logits within fp32 rounding.
    monkeypatch.setattr(model, "LOSS_CHUNK_VALUES", 97 * 5)
    m = build(tie_embeddings=tie)
    idx, targets = torch.randint(0, 97, (3, 16)), torch.randint(0, 97, (3, 16))
    targets[0, :7] = -1
    loss = m(idx, targets)
    loss.backward()
    chunked = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    plain = F.cross_entropy(m(idx).flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
    plain.backward()
    assert loss.item() == pytest.approx(plain.item(), rel=1e-6)
    for name, p in m.named_parameters():
        assert torch.allclose(chunked[name], p.grad, rtol=1e-5, atol=1e-7), name
    with torch.no_grad():  # evaluation: no gradient work, the same value
        assert m(idx, targets).item() == pytest.approx(plain.item(), rel=1e-6)


def test_initial_loss_is_near_uniform():
    m = build()
    loss = m(torch.randint(0, 97, (4, 32)), torch.randint(0, 97, (4, 32)))
    assert abs(loss.item() - math.log(97)) < 0.1


def test_forward_rejects_sequences_longer_than_the_context():
    m = build(max_seq_len=8)
    with pytest.raises(ValueError, match="exceeds max_seq_len=8"):
        m(torch.zeros(1, 9, dtype=torch.long))


def test_causality_future_tokens_never_change_earlier_logits():
    m = build()
    idx = torch.randint(0, 97, (2, 16))
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % 97
    before, after = m(idx), m(changed)
    assert torch.equal(before[:, :9], after[:, :9])
    assert not torch.allclose(before[:, 9:], after[:, 9:])


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = build(n_head=4, n_kv_head=2)
    mha = build(seed=1, n_head=4, n_kv_head=4)
    state = gqa.state_dict()
    head_dim, group = 8, 2
    for key, value in state.items():
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            # (n_kv_head*head_dim, d) -> each KV head copied for the query heads it serves
            value = value.view(2, head_dim, -1).repeat_interleave(group, dim=0).reshape(4 * head_dim, -1)
        mha.state_dict()[key].copy_(value)
    idx = torch.randint(0, 97, (2, 12))
    assert torch.allclose(gqa(idx), mha(idx), atol=1e-5)


def manual_attention(attn, x, cos, sin):
    """Textbook softmax attention with explicit K/V repetition and a causal mask."""
    B, T, _ = x.shape
    q = attn.q_proj(x).view(B, T, attn.n_head, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, attn.n_kv_head, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, attn.n_kv_head, attn.head_dim).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    rep = attn.n_head // attn.n_kv_head
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(attn.head_dim)
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    y = scores.softmax(-1) @ v
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, -1))


@pytest.mark.parametrize("n_kv_head, qkv_bias", [(4, False), (2, True), (1, False)])
def test_sdpa_attention_equals_manual_softmax_attention(n_kv_head, qkv_bias):
    m = build(n_kv_head=n_kv_head, qkv_bias=qkv_bias)
    if qkv_bias:  # zero-initialized biases would not exercise the bias path
        for block in m.layers:
            torch.nn.init.normal_(block.attn.q_proj.bias)
            torch.nn.init.normal_(block.attn.k_proj.bias)
    attn = m.layers[0].attn
    x = torch.randn(2, 11, 32)
    cos, sin = m.rope_cos[:11], m.rope_sin[:11]
    assert torch.allclose(attn(x, cos, sin), manual_attention(attn, x, cos, sin), atol=1e-5)


@pytest.mark.parametrize("dtype, capability, head_dim, training, flash", [
    (torch.bfloat16, (8, 0), 64, True, True),     # A100
    (torch.float16, (9, 0), 128, True, True),     # H100
    (torch.float32, (9, 0), 64, True, False),     # fp32: no flash on any GPU
    (torch.float16, (7, 5), 64, True, False),     # T4: flash needs compute capability 8.0
    (torch.bfloat16, (8, 6), 256, True, False),   # RTX 30xx: no flash backward above head_dim 192
    (torch.bfloat16, (8, 6), 256, False, True),   # ... but inference is fine
    (torch.bfloat16, (9, 0), 320, False, False),  # head_dim above 256
])
def test_flash_attention_rule_per_dtype_and_gpu(dtype, capability, head_dim, training, flash):
    assert model.flash_attention_runs(dtype, capability, head_dim, training) is flash


def test_gqa_repeats_kv_for_the_memory_efficient_kernel_where_flash_cannot_run(monkeypatch):
    """On a GPU where flash cannot run, GQA inside SDPA would take the math kernel (T x T scores
    per head); K/V are repeated instead, which gives the same attention with equal head counts."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(model, "cuda_capability", lambda device: (7, 5))
    assert model.expand_kv_for_sdpa(cuda, torch.float16, 64, training=True)
    assert model.expand_kv_for_sdpa(cuda, torch.float32, 64, training=False)
    assert not model.expand_kv_for_sdpa(torch.device("cpu"), torch.float32, 64, training=True)  # the CPU kernel takes GQA
    monkeypatch.setattr(model, "cuda_capability", lambda device: (8, 0))
    assert not model.expand_kv_for_sdpa(cuda, torch.bfloat16, 64, training=True)
    assert model.attention_kernel(cuda, torch.bfloat16, tiny()) == "flash (GQA inside it)"
    assert model.attention_kernel(cuda, torch.float32, tiny()) == "memory-efficient (K/V repeated for GQA)"
    assert model.attention_kernel(cuda, torch.float32, tiny(n_kv_head=4)) == "memory-efficient"
    assert model.attention_kernel(torch.device("cpu"), torch.float32, tiny()) == "SDPA's cpu kernel (GQA inside it)"

    m = build()
    idx = torch.randint(0, 97, (2, 12))
    heads, real_sdpa = [], F.scaled_dot_product_attention

    def sdpa(q, k, v, **kwargs):
        heads.append((q.shape[1], k.shape[1], kwargs.get("enable_gqa", False)))
        return real_sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    grouped = m(idx)
    assert heads[0] == (4, 2, True)
    monkeypatch.setattr(model, "expand_kv_for_sdpa", lambda *args: True)  # as on such a GPU
    heads.clear()
    assert torch.allclose(m(idx), grouped, atol=1e-5)
    assert heads == [(4, 4, False)] * 2  # every layer: equal head counts, no GQA asked of the kernel


def test_evaluation_computes_no_gradient_of_the_output_head():
    """Under no_grad the chunked loss does the forward matmul only: not dL/dh, not the
    vocab x n_embd fp32 dL/dW of lm_head that training needs."""
    tokens, vocab, dim = 64, 100, 32
    h = torch.randn(tokens, dim, requires_grad=True)
    weight = torch.randn(vocab, dim, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        loss = model.chunked_cross_entropy(h, weight, targets)
    assert counter.get_total_flops() == 2 * tokens * vocab * dim
    assert loss == pytest.approx(F.cross_entropy(h @ weight.t(), targets).item(), rel=1e-5)
    with FlopCounterMode(display=False) as counter:
        model.chunked_cross_entropy(h, weight, targets)
    assert counter.get_total_flops() == 3 * 2 * tokens * vocab * dim  # training: logits, dL/dh, dL/dW


def test_rope_scores_depend_only_on_relative_position():
    cos, sin = model.rope_cos_sin(16, 64, theta=10000.0)
    q, k = torch.randn(16), torch.randn(16)

    def score(m, n):
        qm = apply_rope(q.view(1, 1, 1, 16), cos[m : m + 1], sin[m : m + 1])
        kn = apply_rope(k.view(1, 1, 1, 16), cos[n : n + 1], sin[n : n + 1])
        return (qm * kn).sum().item()

    assert score(5, 2) == pytest.approx(score(40, 37), abs=1e-4)
    assert score(0, 0) == pytest.approx((q * k).sum().item(), abs=1e-5)  # position 0 is identity
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)


def test_rope_theta_changes_the_rotation():
    cos_a, _ = model.rope_cos_sin(16, 8, theta=10000.0)
    cos_b, _ = model.rope_cos_sin(16, 8, theta=1e6)
    assert torch.equal(cos_a[:, 0], cos_b[:, 0])  # the fastest pair always has frequency 1
    assert not torch.allclose(cos_a[:, 2], cos_b[:, 2])  # slower pairs rotate slower with a larger theta


def test_tied_embeddings_share_one_tensor():
    m = build(tie_embeddings=True)
    assert m.lm_head.weight is m.embed.weight
    assert m.num_params() == count_params(m.config)["total"]
    with torch.no_grad():
        m.embed.weight[3, 0] = 123.0
    assert m.lm_head.weight[3, 0].item() == 123.0
    untied = build(tie_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.embed.weight.data_ptr()
    assert untied.num_params() - m.num_params() == 97 * 32


def test_rms_norm_matches_definition():
    norm = model.RMSNorm(8, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 8)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    assert torch.allclose(norm(x), expected, atol=1e-6)
    # Statistics in fp32: 300^2 overflows fp16's range (65504), so an fp16 mean would be inf.
    big = torch.full((1, 8), 300.0, dtype=torch.float16)
    out = model.RMSNorm(8, eps=1e-6)(big)
    assert torch.isfinite(out).all() and torch.allclose(out.float(), torch.ones(1, 8), atol=1e-3)


def test_residual_projections_get_depth_scaled_init():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=64, n_layer=8, n_head=4, n_embd=256))
    q_std = m.layers[0].attn.q_proj.weight.std().item()
    o_std = m.layers[0].attn.o_proj.weight.std().item()
    assert q_std == pytest.approx(0.02, rel=0.05)
    assert o_std == pytest.approx(0.02 / math.sqrt(16), rel=0.05)


def test_grad_checkpointing_gives_equal_gradients():
    m = build()
    m.train()
    idx, targets = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))

    def grads():
        m.zero_grad()
        m(idx, targets).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    plain = grads()
    m.grad_checkpoint = True
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name


# ----------------------------------------------------------------------------- generation


def uncached_greedy(m, idx, n):
    for _ in range(n):
        idx = torch.cat([idx, m(idx)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(n_kv_head=1), dict(n_kv_head=4, qkv_bias=True, tie_embeddings=False), dict(rope_theta=1e6)],
)
def test_cached_greedy_equals_uncached_greedy(overrides):
    m = build(**overrides)
    if overrides.get("qkv_bias"):
        for block in m.layers:
            torch.nn.init.normal_(block.attn.k_proj.bias)
    prompt = torch.randint(0, 97, (3, 7))
    cached = m.generate(prompt, 30, temperature=0)
    assert cached.shape == (3, 37)
    assert torch.equal(cached, uncached_greedy(m, prompt, 30))


def test_kv_cache_is_static_and_written_in_place():
    m = build()
    stream = m.generate_stream(torch.randint(0, 97, (1, 5)), 12, temperature=0)
    next(stream)
    cache = m.layers[0].attn.cache
    assert cache.k.shape == (1, 2, 17, 8)  # batch, n_kv_head, prompt + new, head_dim
    pointer = cache.k.data_ptr()
    for _ in range(10):
        next(stream)
        assert m.layers[0].attn.cache.k.data_ptr() == pointer
    assert cache.k[0, :, :15].abs().sum() > 0  # slots 0..14 were written in place
    list(stream)
    assert m.layers[0].attn.cache is None  # released after generation


def test_generation_stops_at_eos_and_reports_it():
    m = build()
    prompt = torch.randint(0, 97, (1, 4))
    first = m.generate(prompt, 1, temperature=0)[0, -1].item()
    stream = m.generate_stream(prompt, 50, temperature=0, eos_id=first)
    tokens = []
    with pytest.raises(StopIteration) as stop:
        while True:
            tokens.append(next(stream))
    assert stop.value.value == "eos"
    assert [t.item() for t in tokens] == [first]


def test_generation_stops_cleanly_at_the_context_window():
    m = build(max_seq_len=12)
    with pytest.warns(UserWarning, match="max_seq_len=12 is full"):
        out = m.generate(torch.randint(0, 97, (2, 5)), 100, temperature=0.8, top_k=5)
    assert out.shape == (2, 12)
    with pytest.raises(ValueError, match="shorten it"):
        m.generate(torch.zeros(1, 12, dtype=torch.long), 3)


def test_top_k_never_samples_outside_the_k_most_likely():
    logits = torch.randn(4, 50)
    allowed = torch.topk(logits, 5, dim=-1).indices
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        token = sample_next_token(logits, temperature=1.5, top_k=5, generator=g)
        assert (allowed == token[:, None]).any(dim=-1).all()


def test_top_p_never_samples_outside_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]])
    logits = probs.log()
    g = torch.Generator().manual_seed(0)
    seen = {sample_next_token(logits, top_p=0.75, generator=g).item() for _ in range(400)}
    assert seen == {0, 1}  # 0.5 < 0.75, 0.5 + 0.3 reaches it: the nucleus is {0, 1}
    seen = {sample_next_token(logits, top_p=0.2, generator=g).item() for _ in range(100)}
    assert seen == {0}  # the most likely token is always kept


def test_temperature_zero_is_greedy_and_sampling_is_seeded():
    logits = torch.randn(3, 20)
    assert torch.equal(sample_next_token(logits, temperature=0), logits.argmax(-1))
    a = sample_next_token(logits, generator=torch.Generator().manual_seed(7))
    b = sample_next_token(logits, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- accounting


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(qkv_bias=True, tie_embeddings=False), dict(n_kv_head=1, ffn_hidden=100)],
)
def test_count_params_matches_the_built_model(overrides):
    m = build(**overrides)
    counts = count_params(m.config)
    assert counts["total"] == m.num_params()
    assert counts["non_embedding"] == m.num_params(non_embedding=True)


def matmul_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, enable_gqa=False):
    """SDPA written as plain matmuls, so FlopCounterMode sees its FLOPs on CPU too."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    T = q.shape[-2]
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    return scores.softmax(-1) @ v


def test_flops_per_token_matches_a_flop_counter(monkeypatch):
    cfg = tiny(n_layer=3, n_embd=64, n_head=4, n_kv_head=2, vocab_size=101)
    m = Transformer(cfg)
    B, T = 2, 32
    idx = torch.randint(0, 101, (B, T))
    monkeypatch.setattr(F, "scaled_dot_product_attention", matmul_sdpa)
    with FlopCounterMode(display=False) as counter:
        m(idx, idx).backward()
    assert counter.get_total_flops() == pytest.approx(flops_per_token(cfg, T) * B * T, rel=0.01)


def test_mfu_is_achieved_over_peak():
    cfg = tiny()
    fpt = flops_per_token(cfg, 64)
    assert model.estimate_mfu(cfg, 64, tokens_per_s=1000.0, peak_flops=fpt * 4000.0) == pytest.approx(0.25)


# ----------------------------------------------------------------------------- presets

PRESETS = ["tiny_cpu", "home_25m", "home_80m", "home_200m", "qwen_2_5b"]


def preset_model_config(path: str, vocab_size: int = 32000) -> ModelConfig:
    """A preset's architecture, read the one way train.py reads it."""
    from configurator import TrainConfig, parse_args

    return parse_args(TrainConfig, [path]).model_config(vocab_size)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_comment_states_the_computed_parameter_count(name):
    path = f"config/{name}.py"
    text = open(path, encoding="utf-8").read()
    found = re.search(
        r"# Parameters \(python train\.py (\S+) --dry_run(?: --vocab_size=(\d+))?\): ([\d,]+) total, ([\d,]+) non-embedding", text
    )
    assert found, f"{path} lacks the '# Parameters (...)' comment"
    assert found.group(1) == path
    counts = count_params(preset_model_config(path, int(found.group(2) or 32000)))
    assert found.group(3) == f"{counts['total']:,}"
    assert found.group(4) == f"{counts['non_embedding']:,}"


def test_home_presets_have_the_classic_shapes():
    from configurator import read_config_file

    shapes = {name: read_config_file(f"config/{name}.py") for name in ("home_25m", "home_80m", "home_200m")}
    assert [(v["n_embd"], v["n_layer"], v["n_head"]) for v in shapes.values()] == [(512, 8, 8), (768, 12, 12), (1024, 16, 16)]


def test_qwen_preset_shape_and_memory_table_match_the_code():
    from configurator import read_config_file
    from hardware import memory_table

    path = "config/qwen_2_5b.py"
    values = read_config_file(path)
    cfg = preset_model_config(path)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.ffn_hidden) == (36, 2048, 16, 8, 11008)
    assert (cfg.max_seq_len, cfg.rope_theta, cfg.vocab_size, cfg.qkv_bias) == (32768, 1e6, 151936, True)
    assert 3.1e9 < count_params(cfg)["total"] < 3.3e9  # not 2.5B: the comment must not say so either
    table = memory_table(cfg, values["batch_size"], values["block_size"], 8, values["gradient_accumulation_steps"]).splitlines()[1:]
    text = open(path, encoding="utf-8").read()
    for line in table:
        assert f"# {line}\n" in text


def test_vocab_limit_keeps_generation_inside_the_tokenizer():
    m = build()
    with torch.no_grad():
        m.lm_head.weight[90:] += 5.0  # make the padding rows the most likely ones (tied: embed too)
    out = m.generate(torch.randint(0, 90, (2, 4)), 20, temperature=1.0, vocab_limit=90)
    assert out[:, 4:].max().item() < 90
    assert m.generate(torch.randint(0, 90, (2, 4)), 20, temperature=1.0)[:, 4:].max().item() >= 90


def test_a_fixed_cache_len_gives_the_same_tokens_and_static_shapes():
    m = build(max_seq_len=64)
    prompt = torch.randint(0, 97, (2, 5))
    assert torch.equal(m.generate(prompt, 12, temperature=0, cache_len=64), m.generate(prompt, 12, temperature=0))
    stream = m.generate_stream(prompt[:, :3], 4, temperature=0, cache_len=64)
    next(stream)
    assert m.layers[0].attn.cache.k.shape == (2, 2, 64, 8)  # whatever the prompt: one compiled graph
    stream.close()
    with pytest.raises(ValueError, match="cache_len=8 is smaller"):
        m.generate(prompt, 12, cache_len=8)


@pytest.mark.parametrize("n_kv_head, qkv_bias", [(4, True), (2, False), (1, False)])
def test_cached_prefill_in_chunks_equals_one_full_forward(n_kv_head, qkv_bias):
    """The three cached-attention cases: a prefill from position 0 (causal kernel), a chunk
    after cached tokens (explicit mask over the filled slots) and one-token decode steps."""
    m = build(n_kv_head=n_kv_head, qkv_bias=qkv_bias)
    if qkv_bias:
        for block in m.layers:
            torch.nn.init.normal_(block.attn.k_proj.bias)
    idx = torch.randint(0, 97, (2, 14))
    full = m(idx)
    m.setup_cache(2, 32)  # more slots than used: empty slots must never be attended to
    with torch.no_grad():
        assert torch.allclose(m.forward_cached(idx[:, :6], 0), full[:, 5], atol=1e-5)
        assert torch.allclose(m.forward_cached(idx[:, 6:11], 6), full[:, 10], atol=1e-5)
        for t in range(11, 14):
            assert torch.allclose(m.forward_cached(idx[:, t : t + 1], t), full[:, t], atol=1e-5)
    m.clear_cache()


def test_a_decode_step_reads_the_whole_static_cache_under_a_position_mask():
    """The decode step's shapes never change (what a CUDA graph needs): it reads every slot of
    the cache, and slots past the position, whatever they hold, must count for nothing."""
    m = build(max_seq_len=64)
    idx = torch.randint(0, 97, (2, 12))
    full = m(idx)
    m.setup_cache(2, 40)
    with torch.no_grad():
        m.forward_cached(idx[:, :8], 0)
        for block in m.layers:  # garbage in the slots after the prefill, as a reused cache has
            block.attn.cache.k[:, :, 8:] = 1e4
            block.attn.cache.v[:, :, 8:] = -1e4
        pos = torch.tensor([8])
        for t in range(8, 12):
            assert torch.allclose(m.decode_step(idx[:, t : t + 1], pos), full[:, t], atol=1e-4)
            pos += 1
        assert m.layers[0].attn.cache.k.shape == (2, 2, 40, 8)  # the same tensor at every step
    m.clear_cache()


def test_a_compiled_decode_keeps_its_cache_between_calls():
    """CUDA graphs replay on fixed addresses: with a compiled step, generate() reuses the KV
    cache of its last call when the size is the same (eager generation frees it)."""
    m = build(max_seq_len=64)
    prompt = torch.randint(0, 97, (1, 5))
    expected = m.generate(prompt, 10, temperature=0)
    assert m.layers[0].attn.cache is None
    m.compiled_decode = m.decode_step  # stands in for torch.compile's wrapper of the same step
    assert torch.equal(m.generate(prompt, 10, temperature=0), expected)
    cache = m.layers[0].attn.cache
    assert cache is not None and cache.k.shape[2] == 64  # the bucket (capped by max_seq_len)
    m.generate(torch.randint(0, 97, (1, 9)), 5, temperature=0)
    assert m.layers[0].attn.cache is cache  # same size: the same buffers
    m.generate(torch.randint(0, 97, (3, 4)), 5, temperature=0)
    assert m.layers[0].attn.cache.k.shape[0] == 3  # another batch size: a new cache
    idx = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        assert torch.equal(m(idx), build(max_seq_len=64)(idx))  # a plain forward ignores the kept cache


def test_bfloat16_generation_equals_float32_greedy_tokens():
    """bf16 weights round every product to 8 significant bits, so logits move by about 0.3% of
    their scale (measured here: ~0.003 for logits of std ~0.12). Greedy tokens can only differ
    where fp32's two best logits are closer than that; on this model the closest pair along
    the generated text is ~20x further apart, so the tokens must be identical."""
    m32 = build(seed=3)
    m16 = build(seed=3).to(torch.bfloat16)
    prompt = torch.randint(0, 97, (2, 5))
    tokens = m32.generate(prompt, 30, temperature=0)
    with torch.no_grad():
        logits32, logits16 = m32(tokens[:, :-1]), m16(tokens[:, :-1]).float()
    error = (logits32 - logits16).abs().max().item()
    best_two = logits32[:, 4:].topk(2, dim=-1).values
    assert error < 0.01 < (best_two[..., 0] - best_two[..., 1]).min().item()
    assert torch.equal(m16.generate(prompt, 30, temperature=0), tokens)


def test_cache_length_is_what_the_run_needs_or_a_bucket_when_compiled():
    m = build(max_seq_len=64)
    assert m.cache_length(17) == 17  # eager: exactly prompt + new tokens
    assert m.cache_length(17, cache_len=40) == 40
    m.compiled_decode = object()  # what compile_decode sets; only its presence matters here
    assert m.cache_length(17) == 64  # power-of-two buckets of at least 256, capped by max_seq_len
    big = build(max_seq_len=4096)
    big.compiled_decode = object()
    assert [big.cache_length(n) for n in (17, 256, 257, 1000, 4096)] == [256, 256, 512, 1024, 4096]


@pytest.mark.compile
@pytest.mark.parametrize("mm_loops", [True, False])
def test_compiled_decode_gives_the_same_tokens_without_recompiling_per_prompt(mm_loops):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    m = build(n_kv_head=2, max_seq_len=64)
    prompts = [torch.randint(0, 97, (1, n)) for n in (5, 9)]
    expected = [m.generate(p, 12, temperature=0) for p in prompts]
    note = hardware.compile_decode(m, mm_loops=mm_loops)
    assert note == f"decode step compiled, one-row matmuls {'as Inductor loops' if mm_loops else 'through BLAS'} (mm_loops={mm_loops})"
    counters.clear()
    with torch._inductor.config.patch(fx_graph_cache=False):  # a cache hit would skip the passes counted below
        assert torch.equal(m.generate(prompts[0], 12, temperature=0), expected[0])
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1  # the decode step really went through torch.compile
    # with loops, the step's one-row matmuls became Inductor loops (7 per layer: q, k, v, o,
    # gate, up, down); without, none did
    decomposed = counters["inductor"]["decompose_mm"]
    assert decomposed >= 7 * m.config.n_layer if mm_loops else decomposed == 0
    assert torch.equal(m.generate(prompts[1], 12, temperature=0), expected[1])
    assert counters["stats"]["unique_graphs"] == graphs  # another prompt length, same cache bucket: no new graph
    torch._dynamo.reset()
