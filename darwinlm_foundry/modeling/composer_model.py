"""llm-foundry model entry ``darwinlm``: a foundry causal LM over a DarwinLM (or dense) checkpoint.

Registered through the ``llmfoundry_models`` entry point, so a foundry YAML can say::

    model:
      name: darwinlm
      pretrained_model_name_or_path: path/to/pruned_or_dense_checkpoint

It is foundry's ``hf_causal_lm`` with the DarwinLM classes registered in transformers' Auto classes, so
pruned checkpoints load without ``trust_remote_code`` and foundry's HF checkpointer exports them in the
self-contained DarwinLM format.
"""

from llmfoundry.models.hf import ComposerHFCausalLM

import darwinlm_foundry.modeling  # noqa: F401  (registers DarwinLMConfig / DarwinLMForCausalLM)


class ComposerDarwinLM(ComposerHFCausalLM):
    """Foundry's HF causal LM wrapper that understands DarwinLM checkpoints natively."""
