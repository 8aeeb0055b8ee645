"""Configuration of ``ScalevecForCausalLM``, a decoder exported by scalevec (https://arxiv.org/abs/2605.26895).

Written by ``scalevec export`` next to ``modeling_scalevec.py``; needs only ``transformers``.
"""

from transformers import PretrainedConfig


class ScalevecConfig(PretrainedConfig):
    """A Llama-shaped decoder with the norms a scale-vector strategy may keep after folding.

    ``attn_proj_norm`` / ``mlp_proj_norm``: DNP, a parameter-free RMSNorm on every q/k/v (per head) or gate/up
    projection output, followed by that branch's gain. ``qk_norm``: per-head QK-norm before RoPE (Qwen3 and
    Gemma styles). ``post_norm``: a norm on each branch output before the residual add (Gemma style).
    """

    model_type = "scalevec"

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 768,
        intermediate_size: int = 2048,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        num_key_value_heads: int | None = None,
        max_position_embeddings: int = 2048,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6,
        attn_proj_norm: bool = False,
        mlp_proj_norm: bool = False,
        qk_norm: bool = False,
        post_norm: bool = False,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.attn_proj_norm = attn_proj_norm
        self.mlp_proj_norm = mlp_proj_norm
        self.qk_norm = qk_norm
        self.post_norm = post_norm
        self.initializer_range = initializer_range
        self.tie_word_embeddings = tie_word_embeddings
        kwargs.pop("head_dim", None)  # derived above; config.json records it for readers only
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
