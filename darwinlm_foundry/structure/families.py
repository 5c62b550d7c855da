"""Which Hugging Face model families can be pruned, and how each maps onto the DarwinLM format."""

import warnings
from dataclasses import dataclass

SUPPORTED_FAMILIES = ('llama', 'mistral', 'qwen2')


class UnsupportedModelError(ValueError):
    """The model is not a Llama / Mistral / Qwen2 decoder (or a DarwinLM model pruned from one)."""


@dataclass(frozen=True)
class FamilyTraits:
    family: str
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool


def _config_of(model_or_config):
    return getattr(model_or_config, 'config', model_or_config)


def family_of(model_or_config) -> str:
    """The base family (``llama``, ``mistral`` or ``qwen2``) of a dense or DarwinLM model/config."""
    config = _config_of(model_or_config)
    model_type = getattr(config, 'model_type', None)
    if model_type == 'darwinlm':
        return config.base_model_type
    if model_type not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(
            f'model_type {model_type!r} is not supported for DarwinLM structured pruning; supported families '
            f'are {", ".join(SUPPORTED_FAMILIES)} (Llama-2/3.x, Mistral, Qwen2/Qwen2.5) and darwinlm checkpoints. '
            'Convert the checkpoint to one of these architectures first.')
    return model_type


def family_traits(config) -> FamilyTraits:
    """Bias layout of a dense config; warns where our format does not reproduce the dense model exactly."""
    family = family_of(config)
    if getattr(config, 'model_type', None) == 'darwinlm':
        return FamilyTraits(family, config.qkv_bias, config.o_bias, config.mlp_bias)
    if family == 'qwen2':
        if getattr(config, 'use_sliding_window', False):
            warnings.warn('Qwen2 sliding-window attention is not applied by the DarwinLM model: outputs match '
                          'the dense model only on sequences up to sliding_window tokens.')
        return FamilyTraits(family, qkv_bias=True, o_bias=False, mlp_bias=False)
    if family == 'mistral':
        window = getattr(config, 'sliding_window', None)
        if window is not None and window < config.max_position_embeddings:
            warnings.warn(f'Mistral sliding-window attention ({window}) is not applied by the DarwinLM model: '
                          'outputs match the dense model only on sequences up to that length.')
        return FamilyTraits(family, qkv_bias=False, o_bias=False, mlp_bias=False)
    bias = bool(getattr(config, 'attention_bias', False))
    return FamilyTraits(family, qkv_bias=bias, o_bias=bias, mlp_bias=bool(getattr(config, 'mlp_bias', False)))
