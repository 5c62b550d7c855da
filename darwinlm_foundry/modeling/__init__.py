"""The DarwinLM pruned-model format: config + model classes, registered with transformers' Auto classes."""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_darwinlm import DarwinLMConfig
from .modeling_darwinlm import DarwinLMForCausalLM, DarwinLMModel

AutoConfig.register(DarwinLMConfig.model_type, DarwinLMConfig, exist_ok=True)
AutoModelForCausalLM.register(DarwinLMConfig, DarwinLMForCausalLM, exist_ok=True)
# save_pretrained copies both source files next to the weights and writes `auto_map`, so the directory
# loads with stock transformers (trust_remote_code=True) where this package is not installed.
DarwinLMConfig.register_for_auto_class()
DarwinLMForCausalLM.register_for_auto_class('AutoModelForCausalLM')

__all__ = ['DarwinLMConfig', 'DarwinLMForCausalLM', 'DarwinLMModel']
