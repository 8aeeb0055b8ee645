"""``ScalevecForCausalLM``: a decoder exported by scalevec (https://arxiv.org/abs/2605.26895), in plain PyTorch.

Written by ``scalevec export`` next to ``configuration_scalevec.py``; needs only ``torch`` and ``transformers``.
Every gain that is a pure reparameterisation was multiplied into the weights at export, so what is left is a
Llama block plus the norms a strategy may add:

- DNP (``attn_proj_norm`` / ``mlp_proj_norm``): ``γ_a ⊙ RMSNorm(W x̂)`` on each projection (per head for q/k/v),
  with γ_a stored as ``<proj>_norm.weight``;
- QK-norm (``qk_norm``): a per-head RMSNorm of q and k before RoPE;
- post-branch norms (``post_norm``): each branch output normalised before the residual add.

Generation recomputes the whole sequence for every new token instead of keeping a KV cache: simple, and
independent of how ``transformers`` passes its cache between versions.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_scalevec import ScalevecConfig


class ScalevecRMSNorm(nn.Module):
    """``weight ⊙ x / RMS(x)``; with ``group`` the RMS is taken over each group of that many channels (heads)."""

    def __init__(self, dim: int, eps: float, group: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim, self.eps, self.group = dim, eps, group or dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group == self.dim:
            return F.rms_norm(x, (self.dim,), self.weight, self.eps)
        x = F.rms_norm(x.unflatten(-1, (self.dim // self.group, self.group)), (self.group,), None, self.eps)
        return x.flatten(-2) * self.weight


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (B, 1, T, head_dim / 2) of RoPE's angles at ``positions`` (B, T), in fp32."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angle = positions[:, None, :, None].float() * inv
    return angle.cos(), angle.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the (first half, second half) pairs of each head of x (B, H, T, hd)."""
    x1, x2 = x.chunk(2, -1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)


class ScalevecAttention(nn.Module):
    def __init__(self, config: ScalevecConfig):
        super().__init__()
        d, hd, eps = config.hidden_size, config.head_dim, config.rms_norm_eps
        self.h, self.kv, self.hd = config.num_attention_heads, config.num_key_value_heads, hd
        self.q_proj = nn.Linear(d, self.h * hd, bias=False)
        self.k_proj = nn.Linear(d, self.kv * hd, bias=False)
        self.v_proj = nn.Linear(d, self.kv * hd, bias=False)
        self.o_proj = nn.Linear(self.h * hd, d, bias=False)
        if config.attn_proj_norm:
            self.q_proj_norm = ScalevecRMSNorm(self.h * hd, eps, hd)
            self.k_proj_norm = ScalevecRMSNorm(self.kv * hd, eps, hd)
            self.v_proj_norm = ScalevecRMSNorm(self.kv * hd, eps, hd)
        if config.qk_norm:
            self.q_norm = ScalevecRMSNorm(hd, eps)
            self.k_norm = ScalevecRMSNorm(hd, eps)

    def project(self, name: str, x: torch.Tensor) -> torch.Tensor:
        y = getattr(self, f"{name}_proj")(x)
        norm = getattr(self, f"{name}_proj_norm", None)
        return y if norm is None else norm(y)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None):
        B, T, _ = x.shape
        q = self.project("q", x).view(B, T, self.h, self.hd)
        k = self.project("k", x).view(B, T, self.kv, self.hd)
        v = self.project("v", x).view(B, T, self.kv, self.hd)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.kv != self.h:
            k = k.repeat_interleave(self.h // self.kv, 1)
            v = v.repeat_interleave(self.h // self.kv, 1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.h * self.hd))


class ScalevecMLP(nn.Module):
    """SwiGLU; with DNP, ``silu(γ_gate ⊙ RMSNorm(gate)) ⊙ (γ_up ⊙ RMSNorm(up))``."""

    def __init__(self, config: ScalevecConfig):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)
        if config.mlp_proj_norm:
            self.gate_proj_norm = ScalevecRMSNorm(f, config.rms_norm_eps)
            self.up_proj_norm = ScalevecRMSNorm(f, config.rms_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if hasattr(self, "gate_proj_norm"):
            gate, up = self.gate_proj_norm(gate), self.up_proj_norm(up)
        return self.down_proj(F.silu(gate) * up)


class ScalevecDecoderLayer(nn.Module):
    def __init__(self, config: ScalevecConfig):
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = ScalevecRMSNorm(d, eps)
        self.self_attn = ScalevecAttention(config)
        self.pre_feedforward_layernorm = ScalevecRMSNorm(d, eps)
        self.mlp = ScalevecMLP(config)
        if config.post_norm:
            self.post_attention_layernorm = ScalevecRMSNorm(d, eps)
            self.post_feedforward_layernorm = ScalevecRMSNorm(d, eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None):
        a = self.self_attn(self.input_layernorm(x), rope, mask)
        x = x + (self.post_attention_layernorm(a) if hasattr(self, "post_attention_layernorm") else a)
        f = self.mlp(self.pre_feedforward_layernorm(x))
        return x + (self.post_feedforward_layernorm(f) if hasattr(self, "post_feedforward_layernorm") else f)


class ScalevecPreTrainedModel(PreTrainedModel):
    config_class = ScalevecConfig
    base_model_prefix = "model"


class ScalevecModel(ScalevecPreTrainedModel):
    def __init__(self, config: ScalevecConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(ScalevecDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = ScalevecRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The final-norm hidden states (B, T, d). ``attention_mask`` (B, T) marks real tokens with 1."""
        B, T = input_ids.shape
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            keep = attention_mask.bool()
            causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
            mask = causal & keep[:, None, None, :]
            mask = mask | ~mask.any(-1, keepdim=True)  # a padding query attends to all: no NaN rows
            if position_ids is None:  # left padding does not shift the positions of real tokens
                position_ids = (keep.long().cumsum(-1) - 1).clamp(min=0)
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        rope = rope_tables(position_ids, self.config.head_dim, self.config.rope_theta)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, rope, mask)
        return self.norm(x)


class ScalevecForCausalLM(ScalevecPreTrainedModel, GenerationMixin):
    def __init__(self, config: ScalevecConfig):
        super().__init__(config)
        self.model = ScalevecModel(config)
        # A tied head reads the embedding itself, so no weight-tying machinery is needed.
        self.lm_head = None if config.tie_word_embeddings else \
            nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear | None:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                **kwargs) -> CausalLMOutput:
        """Logits (B, T, vocab); with ``labels``, also the mean next-token loss (label -100 is ignored)."""
        h = self.model(input_ids, attention_mask, position_ids)
        head = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(h, head)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                                      **kwargs) -> dict:
        """The whole sequence at every step: this model keeps no KV cache."""
        return {"input_ids": input_ids, "attention_mask": attention_mask}
