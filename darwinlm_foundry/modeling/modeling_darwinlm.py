"""DarwinLM: a physically shrunk Llama-style decoder with per-layer attention heads and MLP widths.

Self-contained remote code (imports only torch and transformers): `save_pretrained` copies this file and
`configuration_darwinlm.py` next to the weights, so stock `AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)` loads it without darwinlm_foundry installed.

The model reuses transformers' Llama forward (masks, rotary embeddings, cache handling, generation) and
replaces only the decoder layer:
- attention keeps its own set of query heads; under grouped-query attention K/V stay whole and each kept
  query head reads its original K/V group through an index (no padding, no masks);
- a unit with nothing kept is absent: the layer adds nothing to the residual for it and skips its norm.
"""

from typing import Tuple

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from .configuration_darwinlm import DarwinLMConfig


class DarwinLMAttention(nn.Module):
    """Attention over a layer's kept query heads; K/V shared per original group (GQA) or pruned (MHA)."""

    def __init__(self, config: DarwinLMConfig, layer_idx: int, cache_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = cache_idx  # slot in the KV cache: removed attention layers take no slot
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        # K/V are expanded to one per query head below, so the attention kernels must not repeat them.
        self.num_key_value_groups = 1
        heads = config.layer_heads[layer_idx]
        self.num_heads = len(heads)
        self.num_key_value_heads, kv_index = config.layer_kv(layer_idx)
        self._kv_index = None if kv_index == list(range(self.num_key_value_heads)) else kv_index
        self._kv_index_cache = {}
        hidden, width, kv_width = config.hidden_size, self.num_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, width, bias=config.qkv_bias)
        self.k_proj = nn.Linear(hidden, kv_width, bias=config.qkv_bias)
        self.v_proj = nn.Linear(hidden, kv_width, bias=config.qkv_bias)
        self.o_proj = nn.Linear(width, hidden, bias=config.o_bias)

    def _expand_kv(self, states):
        if self._kv_index is None:
            return states
        index = self._kv_index_cache.get(states.device)
        if index is None:
            index = torch.tensor(self._kv_index, dtype=torch.long, device=states.device)
            self._kv_index_cache[states.device] = index
        return states.index_select(1, index)

    def forward(self, hidden_states, position_embeddings, attention_mask, past_key_value=None, cache_position=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if past_key_value is not None:
            cache_kwargs = {'sin': sin, 'cos': cos, 'cache_position': cache_position}
            key, value = past_key_value.update(key, value, self.layer_idx, cache_kwargs)
        key, value = self._expand_kv(key), self._expand_kv(value)

        attention_interface = eager_attention_forward
        impl = self.config._attn_implementation
        if impl != 'eager' and not (impl == 'sdpa' and kwargs.get('output_attentions', False)):
            attention_interface = ALL_ATTENTION_FUNCTIONS[impl]
        attn_output, attn_weights = attention_interface(
            self, query, key, value, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling, **kwargs)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class DarwinLMMLP(nn.Module):
    """Gated MLP of a given (pruned) width."""

    def __init__(self, config: DarwinLMConfig, intermediate_size: int):
        super().__init__()
        hidden = config.hidden_size
        self.gate_proj = nn.Linear(hidden, intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(hidden, intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(intermediate_size, hidden, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DarwinLMDecoderLayer(nn.Module):
    """Pre-norm decoder layer whose attention and MLP may each be absent (fully pruned)."""

    def __init__(self, config: DarwinLMConfig, layer_idx: int, cache_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        has_attn = len(config.layer_heads[layer_idx]) > 0
        width = config.layer_intermediate_sizes[layer_idx]
        self.self_attn = DarwinLMAttention(config, layer_idx, cache_idx) if has_attn else None
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps) if has_attn else None
        self.mlp = DarwinLMMLP(config, width) if width > 0 else None
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps) if width > 0 else None

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                output_attentions=False, use_cache=False, cache_position=None, position_embeddings=None,
                **kwargs) -> Tuple[torch.Tensor, ...]:
        attn_weights = None
        if self.self_attn is not None:
            attn_out, attn_weights = self.self_attn(
                hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask,
                position_ids=position_ids, past_key_value=past_key_value, output_attentions=output_attentions,
                use_cache=use_cache, cache_position=cache_position, position_embeddings=position_embeddings,
                **kwargs)
            hidden_states = hidden_states + attn_out
        if self.mlp is not None:
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return (hidden_states, attn_weights) if output_attentions else (hidden_states,)


class DarwinLMPreTrainedModel(LlamaPreTrainedModel):
    config_class = DarwinLMConfig
    base_model_prefix = 'model'
    _no_split_modules = ['DarwinLMDecoderLayer']
    # Per-layer shapes differ, so pre-allocated (static / quantized) caches do not apply.
    _supports_static_cache = False
    _supports_quantized_cache = False
    _supports_flex_attn = False


class DarwinLMModel(DarwinLMPreTrainedModel, LlamaModel):
    """LlamaModel with DarwinLM layers; `LlamaModel.forward` runs unchanged."""

    def __init__(self, config: DarwinLMConfig):
        DarwinLMPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        cache_slots, layers = 0, []
        for layer_idx in range(config.num_hidden_layers):
            layers.append(DarwinLMDecoderLayer(config, layer_idx, cache_slots))
            cache_slots += int(len(config.layer_heads[layer_idx]) > 0)
        self.layers = nn.ModuleList(layers)
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class DarwinLMForCausalLM(DarwinLMPreTrainedModel, LlamaForCausalLM):
    """Causal LM head over `DarwinLMModel`; `LlamaForCausalLM.forward` and generation run unchanged."""

    def __init__(self, config: DarwinLMConfig):
        DarwinLMPreTrainedModel.__init__(self, config)
        self.model = DarwinLMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


__all__ = ['DarwinLMForCausalLM', 'DarwinLMModel', 'DarwinLMPreTrainedModel']
