"""D-AR autoregressive model: the LlamaGen class-conditional GPT (FoundationVision/LlamaGen `gpt.py`) with 1D RoPE.

Sequence: [class embedding, tok_0, ..., tok_{N-2}] -> logits for tok_0 .. tok_{N-1}. RMSNorm (fp32), SwiGLU, fused
bias-free wqkv, 1D RoPE over cls_token_num + N positions (the class token sits at position 0, identity rotation),
null class for classifier-free guidance, zero-initialised output head. Parameter names match LlamaGen/D-AR so the
released `D-AR-L-360K.pt` / `D-AR-XL-360K.pt` load with strict keys.

Sampling keeps its KV cache in local tensors (never registered on the module), so nothing is left in the module
tree or the state_dict afterwards, and the model can train right after sampling.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.checkpoint import extract_state_dict, load_state_dict_strict, safe_torch_load

if TYPE_CHECKING:
    from models.dar_tokenizer import DARTokenizer


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


@dataclass
class GPTConfig:
    dim: int = 1024
    n_layer: int = 24
    n_head: int = 16
    vocab_size: int = 16384
    block_size: int = 256  # number of image tokens
    num_classes: int = 1000
    cls_token_num: int = 1
    multiple_of: int = 256  # SwiGLU hidden = find_multiple(int(2 * 4 * dim / 3), multiple_of)
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    class_dropout_prob: float = 0.1
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def ffn_hidden(self) -> int:
        return find_multiple(int(2 * 4 * self.dim / 3), self.multiple_of)


DAR_GPT_CONFIGS: dict[str, GPTConfig] = {
    "B": GPTConfig(dim=768, n_layer=12, n_head=12),  # 110.9M
    "L": GPTConfig(dim=1024, n_layer=24, n_head=16),  # D-AR-L, 342.9M
    "XL": GPTConfig(dim=1280, n_layer=36, n_head=20),  # D-AR-XL, 774.7M
    "XXL": GPTConfig(dim=1536, n_layer=48, n_head=24),  # D-AR-XXL (paper, ICLR version), 1.411B
    "tiny": GPTConfig(dim=64, n_layer=2, n_head=4, vocab_size=256, block_size=32, num_classes=10, multiple_of=32),
}

# Sampling settings: CFG rising linearly over the tokens, pure multinomial sampling. L: the official FID script
# (`eval_c2i_fid.sh`, 1.2 -> 8.0; the paper text says 1.1); XL: paper Table 4.
DAR_CFG_SCHEDULES: dict[str, tuple[float, float]] = {"L": (1.2, 8.0), "XL": (1.1, 10.0)}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_1d(seq_len: int, head_dim: int, base: float) -> Tensor:
    """(seq_len, head_dim/2, 2) cos/sin table; position 0 (the class token) is the identity rotation."""
    freqs = 1.0 / base ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim)
    angles = torch.outer(torch.arange(seq_len).float(), freqs)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """x (B, T, H, hd), table (T, hd/2, 2): rotate adjacent channel pairs, in fp32."""
    xf = x.float().unflatten(-1, (-1, 2))  # (B, T, H, hd/2, 2)
    cos, sin = table[None, :, None, :, 0], table[None, :, None, :, 1]
    out = torch.stack([xf[..., 0] * cos - xf[..., 1] * sin, xf[..., 1] * cos + xf[..., 0] * sin], dim=-1)
    return out.flatten(-2).type_as(x)


class KVCache:
    """Keys/values of one attention layer for positions [0, length); a plain object, not a module."""

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def update(self, start: int, k: Tensor, v: Tensor, max_len: int) -> tuple[Tensor, Tensor]:
        # k, v (B, H, T, hd) for positions start .. start+T-1 -> all cached keys/values up to start+T
        if self.k is None:
            shape = (*k.shape[:2], max_len, k.shape[-1])
            self.k, self.v = k.new_zeros(shape), v.new_zeros(shape)
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.resid_dropout = nn.Dropout(cfg.resid_dropout_p)

    def forward(self, x: Tensor, rope: Tensor, start: int = 0, cache: KVCache | None = None) -> Tensor:
        cfg = self.cfg
        b, t, _ = x.shape
        q, k, v = self.wqkv(x).view(b, t, 3, cfg.n_head, cfg.head_dim).unbind(2)  # each (B, T, H, hd)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (B, H, T, hd)
        if cache is not None:
            k, v = cache.update(start, k, v, cfg.cls_token_num + cfg.block_size)
        if start > 0 and t > 1:
            raise ValueError("after a cached prefix, feed one token at a time (start > 0 needs a (B, 1, D) input)")
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            is_causal=t > 1,  # a whole prefix from position 0; one new token sees every cached key
            dropout_p=cfg.attn_dropout_p if self.training else 0.0,
        )
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(b, t, cfg.dim)))


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)
        self.ffn_dropout = nn.Dropout(cfg.ffn_dropout_p)

    def forward(self, x: Tensor) -> Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: Tensor, rope: Tensor, start: int = 0, cache: KVCache | None = None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope, start, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class LabelEmbedder(nn.Module):
    """Class embedding with one extra row (index num_classes) for the null class; drops labels in training."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)

    def forward(self, labels: Tensor) -> Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)[:, None]  # (B, 1, D)


class DARGPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.cls_embedding = LabelEmbedder(cfg.num_classes, cfg.dim, cfg.class_dropout_prob)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.tok_dropout = nn.Dropout(cfg.token_dropout_p)
        self.layers = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg.n_layer)])
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.register_buffer(
            "freqs_cis", rope_1d(cfg.block_size + cfg.cls_token_num, cfg.head_dim, cfg.rope_base), persistent=False
        )
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, std=self.cfg.initializer_range)
        nn.init.zeros_(self.output.weight)

    def transformer(self, h: Tensor, start: int = 0, caches: list[KVCache] | None = None) -> Tensor:
        """Embeddings (B, T, D) at positions start .. start+T-1 -> fp32 logits (B, T, V)."""
        rope = self.freqs_cis[start : start + h.shape[1]].to(h.device)
        h = self.tok_dropout(h)
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, start, None if caches is None else caches[i])
        return self.output(self.norm(h)).float()

    def forward(self, tokens: Tensor, labels: Tensor) -> Tensor:
        """Teacher forcing: tokens (B, N), labels (B,) -> logits (B, N, V) predicting tokens[:, i] at position i."""
        h = torch.cat([self.cls_embedding(labels), self.tok_embeddings(tokens[:, :-1])], dim=1)  # (B, N, D)
        return self.transformer(h)


#################################################################################
#                                   Sampling                                    #
#################################################################################


def cfg_schedule(cfg_start: float, cfg_end: float, num_tokens: int) -> Tensor:
    """Official linear CFG schedule: token i uses linspace(start, end, N)[i]; a start of exactly 1 with a larger
    end is bumped to 1.001 (as `generate.py`) so the guided batch is built."""
    if cfg_start == 1.0 and cfg_end > 1.0:
        cfg_start = 1.001
    return torch.linspace(cfg_start, cfg_end, num_tokens)


def sample_logits(
    logits: Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
) -> Tensor:
    """logits (B, V) -> token ids (B, 1): temperature, optional top-k / top-p filtering, multinomial draw."""
    logits = logits / max(temperature, 1e-5)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum > top_p
        remove[:, 1:] = remove[:, :-1].clone()  # keep the first token above the threshold
        remove[:, 0] = False
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    probs = logits.softmax(-1)
    # inverse-CDF draw with the uniform taken on the generator's device: a CPU generator gives the same tokens on
    # any device (the evaluation callbacks seed CPU generators)
    device = generator.device if generator is not None else probs.device
    u = torch.rand(probs.shape[0], 1, generator=generator, device=device).to(probs.device)
    return (probs.cumsum(-1) < u).sum(-1, keepdim=True).clamp(max=probs.shape[-1] - 1)


@torch.no_grad()
def iter_tokens(
    model: DARGPT,
    labels: Tensor,
    cfg_start: float = 1.0,
    cfg_end: float | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    prefix: Tensor | None = None,
    use_kv_cache: bool = True,
    autocast_dtype: torch.dtype | None = None,
) -> Iterator[Tensor]:
    """Sample class-conditional tokens, yielding them as they come: first the given prefix (B, P) if any, then
    one (B, 1) chunk per generated token (feed straight into `DARTokenizer.stream_decode`).

    CFG: logits = u + (c - u) s_i with s = `cfg_schedule(cfg_start, cfg_end)` indexed by absolute token position;
    guidance is on when any s_i > 1 (the batch is doubled with the null class). `prefix` fixes the first P tokens
    (zero-shot layout control). `use_kv_cache=False` recomputes the whole prefix at every step (reference path).
    The model runs in eval mode for the duration; the caches are local and freed on return.
    """
    cfg = model.cfg
    n = cfg.block_size
    scales = cfg_schedule(cfg_start, cfg_start if cfg_end is None else cfg_end, n).tolist()
    guided = max(scales) > 1.0
    b = labels.shape[0]
    cond = torch.cat([labels, torch.full_like(labels, cfg.num_classes)]) if guided else labels
    tokens = labels.new_zeros(b, 0) if prefix is None else prefix.to(labels.device).long().expand(b, -1)
    if tokens.shape[1] > 0:
        yield tokens
    device_type = labels.device.type
    caches = [KVCache() for _ in model.layers] if use_kv_cache else None
    was_training = model.training
    model.eval()
    try:
        cached = 0  # positions already in the KV cache
        for i in range(tokens.shape[1], n):
            seq = torch.cat([tokens, tokens]) if guided else tokens  # (B or 2B, i)
            # autocast per step: a context held across `yield` would leak into the consumer's code
            with torch.autocast(
                device_type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None
            ):
                if caches is None or cached == 0:
                    h = torch.cat([model.cls_embedding(cond), model.tok_embeddings(seq)], dim=1)  # (., 1 + i, D)
                else:
                    h = model.tok_embeddings(seq[:, -1:])  # only the newest token
                logits = model.transformer(h, cached, caches)[:, -1]  # (B or 2B, V) fp32
            if caches is not None:
                cached = 1 + i
            if guided:
                c, u = logits.chunk(2)
                logits = u + (c - u) * scales[i]
            nxt = sample_logits(logits, temperature, top_k, top_p, generator)  # (B, 1)
            tokens = torch.cat([tokens, nxt], dim=1)
            yield nxt
    finally:
        model.train(was_training)
        del caches


def sample_tokens(model: DARGPT, labels: Tensor, **kwargs) -> Tensor:
    """All N tokens (B, N) int64; keyword arguments as `iter_tokens`."""
    return torch.cat(list(iter_tokens(model, labels, **kwargs)), dim=1)


@torch.no_grad()
def sample_with_layout(
    model: DARGPT,
    tokenizer: DARTokenizer,
    reference: Tensor,
    labels: Tensor,
    num_prefix: int,
    generator: torch.Generator | None = None,
    decode_generator: torch.Generator | None = None,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """Zero-shot layout control (paper Sec. 4.4): the first `num_prefix` tokens (coarse layout) come from a
    reference image (1 or B images in [-1, 1]), the rest are sampled for `labels`. Returns (tokens, images)."""
    prefix = tokenizer.encode_tokens(reference)[:, :num_prefix]
    tokens = sample_tokens(model, labels, prefix=prefix, generator=generator, **kwargs)
    return tokens, tokenizer.decode_tokens(tokens, decode_generator)


def bf16_inference_copy(model: DARGPT) -> DARGPT:
    """A bf16-weight copy for sampling (as the official sampler's `--precision bf16`, which casts the GPT): faster
    than bf16 autocast over fp32 weights on hardware with native bf16 matmuls. The RoPE table stays fp32 (the
    official keeps it as a plain fp32 attribute); the input model is untouched."""
    clone = copy.deepcopy(model).to(torch.bfloat16)
    clone.freqs_cis = model.freqs_cis.float().clone()
    return clone.eval().requires_grad_(False)


def load_dar_gpt(path: str, config: GPTConfig | str = "L", use_ema: bool = False) -> DARGPT:
    """Load an official D-AR GPT file (`model` key, as the official samplers; `ema` when use_ema) with strict keys."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"D-AR GPT checkpoint not found: {path!r}. Download D-AR-L-360K.pt / D-AR-XL-360K.pt from the Hugging "
            "Face repo showlab/D-AR."
        )
    cfg = DAR_GPT_CONFIGS[config] if isinstance(config, str) else config
    sd = extract_state_dict(
        safe_torch_load(path),
        ("ema", "model", "module", "state_dict") if use_ema else ("model", "module", "state_dict"),
    )
    with torch.device("meta"):
        model = DARGPT(cfg)
    load_state_dict_strict(model, sd, source=path, assign=True)
    model.freqs_cis = rope_1d(cfg.block_size + cfg.cls_token_num, cfg.head_dim, cfg.rope_base)
    return model.eval()
