"""The Llama family: Llama 2/3.x, Mistral, Qwen2/2.5 (QwQ) and Qwen3 in one model.

They differ only in flags of ``ModelConfig``: q/k/v biases (Qwen2), per-head q/k
RMSNorm (Qwen3), a sliding window (Mistral, some Qwen), tied embeddings, rope
scaling. Module and parameter names follow the Hugging Face checkpoints, so the
loader fills weights by name.

Every forward works on one flattened token axis ``T`` (all scheduled sequences'
new tokens, no padding); ``positions`` gives each token's place in its sequence
and ``AttentionMetadata`` where each sequence starts and which cache it uses.
"""

from __future__ import annotations

import torch

from engine.config import ModelConfig
from engine.layers.activation import silu_and_mul
from engine.layers.attention import Attention, AttentionMetadata, DecodeStep
from engine.layers.embedding import VocabEmbedding
from engine.layers.linear import Linear, make_linear
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding, apply_rotary, apply_rotary_rolled, signed_sin
from engine.quantization.base import QuantConfig

RopeRows = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # cos, sin, signed sin


class LlamaAttention(torch.nn.Module):
    # fused on the CPU at load (engine.layers.cpu_fusion); None until then
    FUSED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}

    def __init__(self, config: ModelConfig, layer_idx: int, quant: QuantConfig | None, prefix: str) -> None:
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        q_out, kv_out, bias = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.attention_bias
        self.q_proj = make_linear(c.hidden_size, q_out, bias, quant, f"{prefix}.q_proj")
        self.k_proj = make_linear(c.hidden_size, kv_out, bias, quant, f"{prefix}.k_proj")
        self.v_proj = make_linear(c.hidden_size, kv_out, bias, quant, f"{prefix}.v_proj")
        self.qkv_proj: Linear | None = None
        self.qkv_sizes = (q_out, kv_out, kv_out)
        self.o_proj = make_linear(q_out, c.hidden_size, False, quant, f"{prefix}.o_proj")
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.qk_norm = c.qk_norm
        self.attn = Attention(
            layer_idx,
            c.num_heads,
            c.num_kv_heads,
            c.head_dim,
            scale=c.head_dim**-0.5,
            sliding_window=c.layer_sliding_window(layer_idx),
        )

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionMetadata,
        sin_signed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        t = x.shape[0]
        if self.qkv_proj is not None and not self.qk_norm and sin_signed is not None:
            # fused on the CPU: q and k are adjacent heads of one output, rotated in one go
            qkv = self.qkv_proj(x).view(t, -1, self.head_dim)  # [T, Hq + 2 Hkv, D]
            qk = apply_rotary_rolled(qkv[:, : self.num_heads + self.num_kv_heads], cos, sin_signed)
            q, k = qk.split((self.num_heads, self.num_kv_heads), dim=1)
            v = qkv[:, self.num_heads + self.num_kv_heads :]
            return self.o_proj(self.attn(q, k, v, ctx))
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:  # Qwen3: per-head RMSNorm before the rotation
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.o_proj(self.attn(q, k, v, ctx))  # [T, Hq * D] -> [T, hidden]


class LlamaMLP(torch.nn.Module):
    FUSED_PROJECTIONS = {"gate_up_proj": ("gate_proj", "up_proj")}  # as LlamaAttention's

    def __init__(self, config: ModelConfig, quant: QuantConfig | None, prefix: str) -> None:
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = make_linear(h, i, bias, quant, f"{prefix}.gate_proj")
        self.up_proj = make_linear(h, i, bias, quant, f"{prefix}.up_proj")
        self.down_proj = make_linear(i, h, bias, quant, f"{prefix}.down_proj")
        self.gate_up_proj: Linear | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(silu_and_mul(gate, up))


class LlamaDecoderLayer(torch.nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, quant: QuantConfig | None) -> None:
        super().__init__()
        prefix = f"model.layers.{layer_idx}"
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx, quant, f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config, quant, f"{prefix}.mlp")

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionMetadata,
        sin_signed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx, sin_signed)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(torch.nn.Module):
    def __init__(self, config: ModelConfig, quant: QuantConfig | None) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.layers = torch.nn.ModuleList(
            LlamaDecoderLayer(config, i, quant) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionMetadata | DecodeStep,
        rope: RopeRows | None = None,
    ) -> torch.Tensor:
        """``rope``: ``rope_rows(positions)`` computed already (a compiled CPU step does it
        outside the graph: the table lookup reads the largest position)."""
        x = self.embed_tokens(input_ids)  # [T, hidden]
        cos, sin, sin_signed = rope if rope is not None else self.rope_rows(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, ctx, sin_signed)
        return self.norm(x)

    def rope_rows(self, positions: torch.Tensor, dtype: torch.dtype) -> RopeRows:
        """``cos, sin [T, head_dim]`` and, on the CPU, ``signed_sin(sin)`` for fused q/k."""
        cos, sin = self.rotary_emb(positions, dtype)
        return cos, sin, signed_sin(sin) if positions.device.type == "cpu" else None


class LlamaForCausalLM(torch.nn.Module):
    """``forward(input_ids [T], positions [T], ctx) -> hidden [T, hidden]``;
    ``compute_logits(hidden [n, hidden]) -> float32 logits [n, vocab]``."""

    def __init__(self, config: ModelConfig, quant: QuantConfig | None = None) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, quant)
        self.lm_head = make_linear(config.hidden_size, config.vocab_size, False, quant, "lm_head")
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding table with the output projection when the config says so;
        the loader calls it again after it assigns the loaded tensors."""
        if self.config.tie_word_embeddings and not self.lm_head.quantized:  # (GGUF: a head
            self.lm_head.weight = self.model.embed_tokens.weight  # of the embedding's blocks)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionMetadata
    ) -> torch.Tensor:
        assert input_ids.shape == positions.shape and input_ids.dim() == 1
        assert input_ids.shape[0] == ctx.num_tokens, "ctx.query_lens must cover every token"
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
