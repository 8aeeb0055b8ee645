"""The decoder: plain single-device PyTorch. Parallelism, compile and autocast are applied from outside."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scalevec.layers import MLP, Attention, BranchDef, OutputNorm, Site, rope_tables
from scalevec.models.config import ModelConfig
from scalevec.roles import Role, tag
from scalevec.strategy import ScaleConfig


class Block(nn.Module):
    """Pre-Norm block; with ``post_norm`` (Gemma style) each branch output is normalised before the residual."""

    def __init__(self, cfg: ModelConfig, scale: ScaleConfig, layer: int, ffn: nn.Module | None = None):
        super().__init__()
        self.attn = Attention(cfg, scale, layer)
        self.ffn = ffn if ffn is not None else MLP(cfg, scale)
        post = cfg.post_norm
        self.post_attn = OutputNorm(cfg.d_model, scale.post_norm, scale, cfg.norm_eps, "post_norm.attn") if post \
            else None
        self.post_ffn = OutputNorm(cfg.d_model, scale.post_norm, scale, cfg.norm_eps, "post_norm.ffn") if post \
            else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None) -> torch.Tensor:
        a = self.attn(x, cos, sin, cache)
        x = x + (self.post_attn(a) if self.post_attn is not None else a)
        f = self.ffn(x)
        return x + (self.post_ffn(f) if self.post_ffn is not None else f)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, scale: ScaleConfig, ffn_factory=None):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be resolved (from the data's tokenizer) before building")
        self.cfg, self.scale = cfg, scale
        self.embed = tag(nn.Parameter(torch.randn(cfg.vocab_size, cfg.d_model) * cfg.init_std), Role.EMBEDDING)
        self.blocks = nn.ModuleList(
            Block(cfg, scale, i, ffn_factory(cfg, scale, i) if ffn_factory else None) for i in range(cfg.n_layers)
        )
        self.head = Site(
            "final", cfg.d_model, [BranchDef("head", cfg.vocab_size)], scale.final, scale, cfg.norm_eps,
            cfg.init_std, weight=self.embed if cfg.tie_embeddings else None, weight_role=Role.HEAD,
        )
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # Found once here: walking every module on each micro-batch would be hot-path work.
        self._aux_modules = [m for m in self.blocks.modules() if hasattr(m, "last_aux_loss")]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """Logits (B, T, V); or, given ``targets``, the mean next-token cross-entropy in fp32."""
        T = idx.shape[1]
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        x = F.embedding(idx, self.embed)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache.layer(i) if cache is not None else None)
        if cache is not None:
            cache.advance(T)
        (logits,) = self.head(x)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def active_params(self) -> dict[str, int]:
        """Parameters a token uses (MoE: top-k routed plus shared experts); empty for a dense model."""
        if self.cfg.moe.num_experts == 0:
            return {}
        from scalevec.models.moe import active_params

        return active_params(self)

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of auxiliary losses recorded by the last forward (MoE load balancing), if any."""
        losses = [m.last_aux_loss for m in self._aux_modules if m.last_aux_loss is not None]
        return torch.stack(losses).sum() if losses else None


class KVCache:
    """Preallocated keys and values for incremental decoding."""

    def __init__(self, model: Decoder, batch: int, max_len: int, device=None, dtype=torch.float32):
        c = model.cfg
        self.pos = 0
        shape = (batch, c.kv_heads, max_len, c.head_dim)
        self._k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(c.n_layers)]
        self._v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(c.n_layers)]

    def layer(self, i: int) -> _LayerCache:
        return _LayerCache(self, i)

    def advance(self, n: int) -> None:
        self.pos += n


class _LayerCache:
    def __init__(self, cache: KVCache, i: int):
        self.cache, self.i = cache, i

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p, T = self.cache.pos, k.shape[2]
        ks, vs = self.cache._k[self.i], self.cache._v[self.i]
        ks[:, :, p:p + T] = k
        vs[:, :, p:p + T] = v
        return ks[:, :, :p + T], vs[:, :, :p + T]
