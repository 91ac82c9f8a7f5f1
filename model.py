"""The HomeLLM architecture: a Llama/Qwen2-class decoder-only transformer.

Everything lives in this one file and depends only on torch:

    tokens -> embedding -> n_layer x [RMSNorm -> GQA attention (RoPE) -> +residual
                                      RMSNorm -> SwiGLU MLP           -> +residual]
           -> RMSNorm -> lm_head (tied to the embedding or not) -> logits

Parameter names follow the Hugging Face Llama/Qwen2 layout (q_proj, gate_proj, ...) and
RoPE uses the same "rotate half" convention, so export_hf.py maps weights one to one
without permuting q/k.

Generation uses a static KV cache: buffers of the final size are allocated once per
generate() call and written in place (no torch.cat). A decode step reads the whole cache
under a mask of the filled slots, so its shapes never change: compiled, it runs as one CUDA
graph on GPUs.

`python train.py config/home_25m.py --dry_run` prints a preset's parameter count, FLOPs and memory.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: Optional[int] = None  # None -> n_head (plain multi-head attention); 1 -> MQA
    n_embd: int = 768
    ffn_hidden: Optional[int] = None  # None -> Llama's rule, see default_ffn_hidden()
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    qkv_bias: bool = False  # Qwen2 puts a bias on the q/k/v projections
    dropout: float = 0.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.ffn_hidden is None:
            self.ffn_hidden = default_ffn_hidden(self.n_embd)
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "ffn_hidden", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                f"pick n_head among the divisors of n_embd (e.g. {_near_divisor(self.n_embd, self.n_head)})"
            )
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}; "
                f"each KV head must serve the same number of query heads (e.g. n_kv_head={_near_divisor(self.n_head, self.n_kv_head)})"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"head_dim = n_embd/n_head = {self.head_dim} is odd, but RoPE rotates pairs of "
                "dimensions; change n_embd or n_head so that head_dim is even"
            )
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise ValueError(f"rope_theta={self.rope_theta} and norm_eps={self.norm_eps} must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        """Build from a dict that may carry extra keys (e.g. a whole train config)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def default_ffn_hidden(n_embd: int, multiple_of: int = 256) -> int:
    """Llama's SwiGLU width: 2/3 of the classic 4*n_embd (three matrices instead of two keep
    the parameter count), rounded up to a multiple of 256 for friendly matmul shapes."""
    hidden = int(2 * 4 * n_embd / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


def _near_divisor(n: int, want: int) -> int:
    """The divisor of n nearest to want (the smaller on a tie). Divisors come in pairs (d, n/d)
    with d <= sqrt(n): O(sqrt(n)), so a typo like n_embd=100000001 is refused at once."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return min(small + [n // d for d in small], key=lambda d: (abs(d - want), d))


# ----------------------------------------------------------------------------- building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32: the mean of squares in bf16/fp16 loses precision or overflows.
        # Cast back before the gain, exactly as HF Llama does, so exported logits match.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (max_seq_len, head_dim) for the "rotate half" layout: dimension
    i and i + head_dim/2 form one rotating pair with frequency theta^(-2i/head_dim)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (T, D). Rotates each (x_i, x_{i+D/2}) pair by its angle."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache(nn.Module):
    """Pre-allocated keys/values for one layer: (batch, n_kv_head, length, head_dim), written in
    place, so decoding never reallocates. A prefill reads back the filled prefix; a decode step
    reads the whole cache under a mask of the filled slots, so that its shapes never change."""

    def __init__(self, batch: int, n_kv_head: int, length: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_head, length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("slots", torch.arange(length, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v (B, n_kv_head, T, head_dim) at slots start..start+T-1; return slots 0..start+T-1."""
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def write_at(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write one position's k/v (B, n_kv_head, 1, head_dim) at slot pos (a one-element
        tensor); return the whole cache and which of its slots are filled (0..pos)."""
        self.k.index_copy_(2, pos, k)
        self.v.index_copy_(2, pos, v)
        return self.k, self.v, self.slots <= pos


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)
        self.dropout = cfg.dropout
        self.cache: Optional[KVCache] = None

    def forward(self, x, cos, sin, start: Optional[int | torch.Tensor] = None):
        """start: where x's tokens sit when generating with the KV cache: the first position of
        a prefill (an int), or the position of a one-token decode step (a one-element tensor)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if start is None:  # a whole sequence (training, evaluation): the KV cache, if one is kept, is not involved
            y = self._attend(q, k, v, is_causal=True, dropout=self.dropout if self.training else 0.0)
        elif isinstance(start, torch.Tensor):
            y = self._decode_attention(q, k, v, start)
        else:
            y = self._cached_attention(q, k, v, start)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))

    def _attend(self, q, k, v, is_causal: bool, dropout: float = 0.0):
        """SDPA over whole sequences. With GQA, the kernel that runs must take it: SDPA's flash
        kernel does (K/V are never repeated), but where flash cannot run (fp32 on any GPU, fp16
        before Ampere) only the math kernel would, storing T x T scores per head; there K/V are
        repeated so that the memory-efficient kernel runs instead (expand_kv_for_sdpa). On the
        CPU SDPA's own kernel takes GQA as is."""
        gqa = self.n_kv_head != self.n_head
        if gqa and expand_kv_for_sdpa(q.device, q.dtype, self.head_dim, q.requires_grad):
            rep = self.n_head // self.n_kv_head
            k, v, gqa = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), False
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, dropout_p=dropout, enable_gqa=gqa)

    def _cached_attention(self, q, k, v, start: int):
        """A prefill: attention over the filled part of the KV cache only. From position 0 it is
        plain causal attention (no mask, so SDPA may take its flash kernel)."""
        T = q.shape[2]
        k, v = self.cache.update(start, k, v)
        if start == 0:
            return self._attend(q, k, v, is_causal=T > 1)
        # A chunk after cached tokens: query i (at start + i) sees slots 0..start + i. The
        # mask rules out the kernels that take GQA, so K/V are repeated for this rare case.
        visible = torch.ones(T, start + T, dtype=torch.bool, device=q.device).tril(start)
        rep = self.n_head // self.n_kv_head
        return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=visible)

    def _decode_attention(self, q, k, v, pos: torch.Tensor):
        """One token at position pos, over the whole static cache with the unfilled slots masked
        out: every shape is the same at every step, which lets the step compile once and run as
        a CUDA graph. The query heads that share a KV head are laid out as that head's query
        rows, so this is plain attention (no GQA kernel needed, no K/V repeated) and the
        memory-efficient kernel on CUDA, the CPU's own kernel elsewhere, take the mask."""
        B, H, _, D = q.shape
        k, v, visible = self.cache.write_at(pos, k, v)
        q = q.reshape(B, self.n_kv_head, H // self.n_kv_head, D)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible.view(1, 1, 1, -1))
        return y.reshape(B, H, 1, D)


def flash_attention_runs(dtype: torch.dtype, capability: tuple[int, int], head_dim: int, training: bool) -> bool:
    """Whether SDPA's flash kernel takes attention in `dtype` on a CUDA GPU of this compute
    capability (the rules of torch 2.13's sdp_utils): fp16 or bf16 on compute capability 8.0 to
    12.1, head_dim at most 256 (a multiple of 8); and on 8.6-8.9 and 12.x (consumer cards) not
    for training with head_dim above 192."""
    if dtype not in (torch.float16, torch.bfloat16) or not (8, 0) <= tuple(capability) <= (12, 1):
        return False
    if head_dim > 256 or head_dim % 8:
        return False
    consumer = (8, 6) <= tuple(capability) <= (8, 9) or tuple(capability) >= (12, 0)
    return not (training and consumer and head_dim > 192)


def expand_kv_for_sdpa(device: torch.device, dtype: torch.dtype, head_dim: int, training: bool) -> bool:
    """Whether GQA attention should repeat K/V before SDPA: on a CUDA GPU where the flash kernel
    cannot run. SDPA takes GQA (enable_gqa) only in its flash and math kernels on CUDA, and
    the math kernel stores the T x T scores of every head (2 GiB per layer for home_200m at
    8 x 2048); with K/V repeated the memory-efficient kernel runs, whose memory is linear in T."""
    return device.type == "cuda" and not flash_attention_runs(dtype, cuda_capability(device), head_dim, training)


@torch.compiler.assume_constant_result  # a compiled block asks once, while tracing, and keeps the answer
def cuda_capability(device: torch.device) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(device)
    return props.major, props.minor


def attention_kernel(device: torch.device, dtype: torch.dtype, cfg: "ModelConfig", training: bool = True) -> str:
    """The SDPA kernel training attention (and a prefill) takes, in words: for logs and
    tools/gpu_check.py."""
    if device.type != "cuda":
        return f"SDPA's {device.type} kernel" + (" (GQA inside it)" if cfg.n_kv_head != cfg.n_head else "")
    if flash_attention_runs(dtype, cuda_capability(device), cfg.head_dim, training):
        return "flash" + (" (GQA inside it)" if cfg.n_kv_head != cfg.n_head else "")
    return "memory-efficient" + (" (K/V repeated for GQA)" if cfg.n_kv_head != cfg.n_head else "")


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, start: Optional[int | torch.Tensor] = None):
        x = x + self.resid_dropout(self.attn(self.attn_norm(x), cos, sin, start))
        return x + self.resid_dropout(self.mlp(self.mlp_norm(x)))


# ----------------------------------------------------------------------------- loss

# Logit values per chunk of the loss: 2**26 fp32 values are 256 MiB, whatever the vocabulary.
LOSS_CHUNK_VALUES = 2**26


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (h @ weight.T) against targets, ignoring targets == -1.

    The logits of a (tokens x vocab) batch are the biggest tensor of a training step (16k
    tokens x 152k vocab in fp32 is 10 GB, and plain autograd keeps them and their gradient).
    Here they exist one chunk of rows at a time: each chunk's loss AND its gradients with
    respect to h and weight are computed in forward, so backward only scales the stored
    gradients by the incoming one. Same FLOPs as the unchunked loss, no recomputation."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_tokens, grad_enabled):
        valid = targets != -1
        count = valid.sum().clamp(min=1)
        # needs_input_grad follows requires_grad even under torch.no_grad() (forward itself
        # always runs without grad mode): the caller's grad mode decides, so an evaluation
        # computes no gradients (dL/dW alone is a vocab x n_embd fp32 tensor and a matmul per chunk).
        want_h, want_w = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            logits = (h[rows] @ weight.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            target = targets[rows].clamp(min=0)  # -1 rows pick row 0 and are masked out below
            picked = logits.gather(1, target[:, None]).squeeze(1)
            loss += torch.where(valid[rows], lse - picked, 0.0).sum()
            if want_h or want_w:
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' memory
                grad[torch.arange(len(target), device=grad.device), target] -= 1.0
                grad = grad.mul_(valid[rows, None]).to(h.dtype)
                if want_h:
                    grad_h[rows] = grad @ weight
                if want_w:
                    grad_w += (grad.t() @ h[rows]).float()
        ctx.save_for_backward(grad_h, grad_w, count)
        ctx.weight_dtype = weight.dtype
        return loss / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, count = ctx.saved_tensors
        scale = grad_loss / count
        return (
            grad_h * scale.to(grad_h.dtype) if grad_h is not None else None,
            (grad_w * scale).to(ctx.weight_dtype) if grad_w is not None else None,
            None,
            None,
            None,
        )


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """h: (tokens, n_embd), weight: (vocab, n_embd), targets: (tokens,) -> the mean loss."""
    chunk_tokens = max(1, LOSS_CHUNK_VALUES // weight.shape[0])
    return _ChunkedCrossEntropy.apply(h, weight, targets, chunk_tokens, torch.is_grad_enabled())


# ----------------------------------------------------------------------------- the model


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # Not persistent: derived from the config, so checkpoints stay weights-only.
        cos, sin = rope_cos_sin(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # Recompute each block's activations in backward instead of storing them (switchable
        # at run time; train.py sets it from --grad_checkpoint).
        self.grad_checkpoint = False
        self.compiled_decode = None  # set by compile_decode()
        self.reset_parameters()

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """Initialize every parameter (see init_parameter) and the RoPE tables. Parameters are
        drawn one after another in named_parameters() order from `generator` (default: torch's
        global one), so any code that walks the same order with the same generator, e.g. one
        full tensor at a time for a sharded model, gets the same weights."""
        with torch.no_grad():
            for name, param in self.named_parameters():
                self.init_parameter(name, param, generator)
        self.init_rope()

    def init_parameter(self, name: str, tensor: torch.Tensor, generator: Optional[torch.Generator] = None) -> None:
        """N(0, init_std) for embeddings and linear weights, zero biases, unit norm gains. The
        two projections that write into the residual stream (o_proj, down_proj) get
        init_std / sqrt(2 * n_layer), so the residual's variance does not grow with depth
        (GPT-2's scaling)."""
        std = self.config.init_std
        if name.endswith("norm.weight"):
            nn.init.ones_(tensor)
        elif name.endswith(".bias"):
            nn.init.zeros_(tensor)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            nn.init.normal_(tensor, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer), generator=generator)
        else:
            nn.init.normal_(tensor, mean=0.0, std=std, generator=generator)

    def init_rope(self) -> None:
        """Fill the RoPE tables (buffers derived from the config, never saved)."""
        cos, sin = rope_cos_sin(self.config.head_dim, self.config.max_seq_len, self.config.rope_theta)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """idx: (B, T) token ids. Returns logits (B, T, vocab); or, when targets are given, only
        the loss (the mean cross-entropy over targets != -1), computed without ever holding
        the whole (tokens x vocab) logits: see chunked_cross_entropy."""
        T = idx.shape[1]
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.config.max_seq_len}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.embed(idx)
        for block in self.layers:
            if self.grad_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
        h = self.norm(x)
        if targets is None:
            return self.lm_head(h)
        return chunked_cross_entropy(h.flatten(0, 1), self.lm_head.weight, targets.reshape(-1))

    # ------------------------------------------------------------------------- generation

    def setup_cache(self, batch: int, length: int) -> None:
        """Give every layer a static KV cache (batch, n_kv_head, length, head_dim). With a
        compiled decode step the caches of the last call are kept when they have this size:
        the step's graph (a CUDA graph on GPUs) then finds its buffers where it left them, and
        their old contents are never read (the step masks out the unfilled slots)."""
        p = self.embed.weight
        first = self.layers[0].attn.cache
        if (self.compiled_decode is not None and first is not None and first.k.shape[0] == batch and first.k.shape[2] == length
                and first.k.dtype == p.dtype and first.k.device == p.device):
            return
        for block in self.layers:
            block.attn.cache = KVCache(batch, self.config.n_kv_head, length, self.config.head_dim, p.dtype, p.device)
            if self.compiled_decode is not None and p.is_cuda:
                # Fixed addresses: a CUDA graph of the step may then write into the cache in
                # place (Inductor does not capture steps that mutate other inputs).
                torch._dynamo.mark_static_address(block.attn.cache.k)
                torch._dynamo.mark_static_address(block.attn.cache.v)

    def clear_cache(self) -> None:
        for block in self.layers:
            block.attn.cache = None

    def compile_decode(self, options: Optional[dict] = None, mode: Optional[str] = None) -> None:
        """torch.compile the one-token decode step (decode_step): the part of generation that
        runs once per new token (the prefill runs once per prompt and stays eager). options:
        Inductor's options, or mode: torch.compile's mode ("reduce-overhead" captures the step
        as a CUDA graph, which removes the launch cost of its few hundred small kernels);
        hardware.compile_decode picks them for the device.

        The step's shapes never change (the position is a tensor, the cache is read whole under
        a mask), so it compiles with static shapes, once per cache size; generate() sizes the
        cache in power-of-two buckets so that runs of similar length share one graph, and keeps
        it between calls. One graph for the whole step rather than one per Block: calling a
        compiled function costs guards and Python each time, which n_layer calls per token
        would pay n_layer times."""
        self.compiled_decode = torch.compile(self.decode_step, dynamic=False, mode=mode, options=options or None)

    def cache_length(self, needed: int, cache_len: Optional[int] = None) -> int:
        """KV cache slots for a run that needs `needed`: cache_len when given, `needed` itself
        (the least memory), or with a compiled decode step the power-of-two bucket (at least
        256) that holds it, so that runs of similar length share one compiled graph. Never
        more than max_seq_len."""
        if cache_len:
            length = cache_len
        elif self.compiled_decode is not None:
            length = max(256, 1 << (needed - 1).bit_length())
        else:
            length = needed
        return min(length, self.config.max_seq_len)

    def forward_cached(self, idx: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
        """Run tokens idx (B, T) that sit at positions start..start+T-1 through the model,
        reading and writing the KV cache. Returns logits of the last position only: (B, vocab).
        One-token steps go through decode (compiled when compile_decode() made it so); their
        start may be a one-element tensor on the device, which the generation loop advances
        there (a Python int would be copied to the GPU, and wait for it, at every step)."""
        if idx.shape[1] == 1:
            return self.decode(idx, start if isinstance(start, torch.Tensor) else torch.tensor([start], device=idx.device))
        return self.run_cached(idx, start)

    def run_cached(self, idx: torch.Tensor, start: int) -> torch.Tensor:
        """A prefill: tokens at positions start..start+T-1 (start is a Python int, which the
        generation loop knows without asking the device)."""
        T = idx.shape[1]
        cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
        x = self.embed(idx)
        for block in self.layers:
            x = block(x, cos, sin, start)
        return self.lm_head(self.norm(x[:, -1]))

    def decode(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """decode_step, through the compiled graph when there is one."""
        if self.compiled_decode is None:
            return self.decode_step(token, pos)
        if token.is_cuda:
            # The previous step's logits (the graph's output memory) are no longer needed:
            # CUDA graphs may overwrite them.
            torch.compiler.cudagraph_mark_step_begin()
        return self.compiled_decode(token, pos)

    def decode_step(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One new token per row, token (B, 1), at position pos (a one-element long tensor on
        the model's device) -> logits (B, vocab). Every shape is fixed whatever the position:
        what compile_decode compiles."""
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        x = self.embed(token)
        for block in self.layers:
            x = block(x, cos, sin, pos)
        return self.lm_head(self.norm(x[:, -1]))

    @torch.no_grad()
    def generate_stream(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        eos_id: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        vocab_limit: Optional[int] = None,
        cache_len: Optional[int] = None,
    ) -> Iterator[torch.Tensor]:
        """Yield the next token of every row, shape (B,), as soon as it is sampled.

        The prompt is prefilled in one pass, then one token per step. Stops after
        max_new_tokens, when every row has produced eos_id (rows that finished early keep
        yielding eos_id), or when the context window is full. The generator's return value
        (StopIteration.value) says which: "max_new_tokens", "eos" or "max_seq_len".
        vocab_limit: only ids below it are sampled (a model's vocab padded past its
        tokenizer's, like Qwen2.5's 151936 rows for 151665 tokens, has rows with no text).
        cache_len: KV cache slots (default: see cache_length). Attention never sees the unfilled
        slots whatever the size; a fixed value gives every call the same cache shapes, so a
        compiled decode step (compile_decode) never recompiles.
        """
        B, T = idx.shape
        if T == 0:
            raise ValueError("generate needs a prompt of at least one token")
        if T >= self.config.max_seq_len:
            raise ValueError(f"the prompt has {T} tokens but max_seq_len={self.config.max_seq_len}; shorten it")
        needed = min(T + max_new_tokens, self.config.max_seq_len)
        length = self.cache_length(needed, cache_len)
        if length < needed:
            raise ValueError(f"cache_len={cache_len} is smaller than the prompt ({T}) plus max_new_tokens ({max_new_tokens})")
        was_training = self.training
        self.eval()
        self.setup_cache(B, length)
        try:
            logits = self.forward_cached(idx, 0)
            pos = torch.tensor([T], device=idx.device)  # the next token's position, kept on the device
            finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
            for step in range(max_new_tokens):
                if vocab_limit is not None and vocab_limit < logits.size(-1):
                    logits[:, vocab_limit:] = float("-inf")
                token = sample_next_token(logits, temperature, top_k, top_p, generator)
                if eos_id is not None:
                    token = torch.where(finished, torch.full_like(token, eos_id), token)
                    finished |= token == eos_id
                yield token
                if eos_id is not None and bool(finished.all()):
                    return "eos"
                if step + 1 == max_new_tokens:
                    break
                if T + step + 1 >= self.config.max_seq_len:
                    return "max_seq_len"  # prompt + new tokens fill the context window
                logits = self.forward_cached(token[:, None], pos)
                pos += 1
            return "max_new_tokens"
        finally:
            if self.compiled_decode is None:
                self.clear_cache()  # (a compiled step keeps its cache for the next call)
            self.train(was_training)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, **sampling) -> torch.Tensor:
        """Non-streaming generate_stream (same arguments): idx with the new tokens appended,
        (B, T + n). Warns when the context window filled up before max_new_tokens."""
        stream = self.generate_stream(idx, max_new_tokens, **sampling)
        new_tokens = []
        while True:
            try:
                new_tokens.append(next(stream))
            except StopIteration as stop:
                if stop.value == "max_seq_len":
                    warnings.warn(
                        f"generation stopped after {len(new_tokens)} new tokens: the context "
                        f"window max_seq_len={self.config.max_seq_len} is full"
                    )
                break
        return torch.cat([idx, torch.stack(new_tokens, dim=1)], dim=1) if new_tokens else idx

    # ------------------------------------------------------------------------- accounting

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters (a tied lm_head is counted once). non_embedding leaves out the
        token embedding table, which is a lookup, not compute; an untied lm_head stays in."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts from the config alone (no tensors), so even a 3B preset is instant."""
    d, hd = cfg.n_embd, cfg.head_dim
    q_out, kv_out = cfg.n_head * hd, cfg.n_kv_head * hd
    attn = d * q_out + 2 * d * kv_out + q_out * d + (q_out + 2 * kv_out) * cfg.qkv_bias
    mlp = 3 * d * cfg.ffn_hidden
    per_layer = attn + mlp + 2 * d  # two RMSNorm gains
    embedding = cfg.vocab_size * d
    lm_head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    total = embedding + cfg.n_layer * per_layer + d + lm_head
    return {"total": total, "non_embedding": total - embedding, "embedding": embedding, "per_layer": per_layer}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at context length seq_len.

    6 FLOPs per matmul weight and token (2 forward, 4 backward), counting the lm_head matmul
    even when tied (it is real compute), plus attention's two T x T products: per layer and
    token 2*2*seq_len*(n_head*head_dim) forward, x3 with backward. GQA shows up through the
    smaller k/v projections; the score matmuls are per query head. Like PaLM's formula this
    counts the full seq_len, not the causal half.
    """
    counts = count_params(cfg)
    matmul_weights = counts["non_embedding"] - (2 * cfg.n_layer + 1) * cfg.n_embd  # drop norm gains
    if cfg.qkv_bias:
        matmul_weights -= cfg.n_layer * (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim
    if cfg.tie_embeddings:
        matmul_weights += cfg.vocab_size * cfg.n_embd
    attention = 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len
    return 6.0 * matmul_weights + attention


def estimate_mfu(cfg: ModelConfig, seq_len: int, tokens_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilization: achieved training FLOP/s over the hardware's peak FLOP/s."""
    return flops_per_token(cfg, seq_len) * tokens_per_s / peak_flops


# ----------------------------------------------------------------------------- optimizer


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """An approximately orthogonal matrix with g's singular vectors (U V^T of g = U S V^T): a
    quintic Newton-Schulz iteration whose coefficients push every singular value toward 1 fast
    (they end up near 0.7-1.2, which trains as well as exactly 1). bf16 on GPUs, where it is
    fast; fp32 on CPUs, where many emulate bf16 matmuls far slower than fp32 ones."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16() if g.is_cuda else g.float()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.t()
    x = x / (x.norm() + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.t()
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.t() if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon (MomentUm Orthogonalized by Newton-Schulz) for 2-D weight matrices: SGD with Nesterov
    momentum whose update is orthogonalized, so every direction of the matrix moves by a similar
    amount. The update is scaled by 0.2 * sqrt(max(rows, cols)), which gives it the RMS of a
    typical AdamW update, so Muon and AdamW can share one learning rate. Weight decay is
    decoupled, as in AdamW. (torch.optim.Muon does the same but always orthogonalizes in bf16,
    which is slow on CPUs without native bf16.)"""

    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.95, ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)
                update = orthogonalize(p.grad.add(buf, alpha=group["momentum"]), group["ns_steps"])
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * 0.2 * math.sqrt(max(p.shape)))


def make_optimizer(
    model: nn.Module, learning_rate: float, weight_decay: float, betas: tuple[float, float], fused: bool = False,
    kind: str = "adamw",
) -> list[torch.optim.Optimizer]:
    """The optimizers of a training run, as a list (callers step each).

    adamw: AdamW for everything, with weight decay on matrices (linear weights, embedding) only:
    decaying norm gains and biases toward zero only hurts. fused: one kernel for all parameters
    (CUDA, parameters on the GPU).
    muon: Muon for the matrices inside the blocks (q/k/v/o and the SwiGLU projections): it
    orthogonalizes each update (Newton-Schulz), which lets small models learn more per step;
    its per-matrix scale matches AdamW's update size, so both share learning_rate. The embedding,
    a separate lm_head, norms and biases stay with AdamW, as in modded-nanogpt.
    Works on a plain or (AdamW only) an FSDP-sharded model."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    hidden = [p for name, p in named if kind == "muon" and p.dim() == 2 and name.startswith("layers.")]
    taken = {id(p) for p in hidden}
    rest = [(name, p) for name, p in named if id(p) not in taken]
    groups = [
        {"params": [p for _, p in rest if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for _, p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizers: list[torch.optim.Optimizer] = []
    if hidden:
        optimizers.append(Muon(hidden, lr=learning_rate, weight_decay=weight_decay))
    optimizers.append(torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused or None))
    return optimizers


# ----------------------------------------------------------------------------- sampling


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). temperature 0 is greedy. top_k keeps the k most likely
    tokens; top_p keeps the smallest set whose probability reaches p (always at least one)."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if temperature == 0:
        return logits.argmax(dim=-1)
    # Shift so the largest logit is 0 before dividing: with a tiny temperature (1e-45) the
    # quotients then go to -inf (a one-hot softmax) instead of overflowing into inf - inf = nan.
    logits = logits.float()
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if top_k is not None and top_k < logits.size(-1):
        if top_k < 1:
            raise ValueError(f"top_k={top_k} must be >= 1")
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p; the first never drops.
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------- description


def describe(cfg: ModelConfig, seq_len: Optional[int] = None) -> str:
    counts = count_params(cfg)
    seq_len = seq_len or cfg.max_seq_len
    return (
        f"parameters: {counts['total']:,} total, {counts['non_embedding']:,} non-embedding "
        f"(vocab_size={cfg.vocab_size}, tied={cfg.tie_embeddings})\n"
        f"layers={cfg.n_layer} n_embd={cfg.n_embd} heads={cfg.n_head} kv_heads={cfg.n_kv_head} "
        f"head_dim={cfg.head_dim} ffn_hidden={cfg.ffn_hidden} max_seq_len={cfg.max_seq_len}\n"
        f"training FLOPs per token at seq_len {seq_len}: {flops_per_token(cfg, seq_len):.4g}"
    )
