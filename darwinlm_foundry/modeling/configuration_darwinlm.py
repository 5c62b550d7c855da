"""Configuration of a DarwinLM structurally pruned decoder (Llama / Mistral / Qwen2 families).

Self-contained: imports only `transformers`, so a saved model loads with stock
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` where darwinlm_foundry is absent.
"""

from transformers.models.llama.configuration_llama import LlamaConfig


class DarwinLMConfig(LlamaConfig):
    """A Llama-style decoder whose layers each keep their own subset of query heads and MLP width.

    Every shape is in the config. The dense-model fields keep their original meaning
    (``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size`` are the sizes of the model
    the pruned one came from); per-layer shapes are:

    Args:
        base_model_type: family of the dense model (``llama``, ``mistral`` or ``qwen2``).
        layer_heads: per layer, the kept query heads in the dense model's numbering (sorted). A head ``h``
            reads K/V group ``h // (num_attention_heads // num_key_value_heads)``. Under grouped-query
            attention K/V stay whole; under multi-head attention (``num_key_value_heads ==
            num_attention_heads``) K/V heads are pruned together with their query head. ``[]`` removes
            the layer's attention (and its input norm) entirely.
        layer_intermediate_sizes: per layer, the MLP width kept. ``0`` removes the MLP (and its norm).
        qkv_bias / o_bias: whether q/k/v and o projections carry biases (Qwen2: q/k/v only). Default to
            ``attention_bias``.
        levels: optional record of the sparsity level of each unit, ``{'attn': [...], 'mlp': [...]}``.
        level_steps: optional record of the level step per kind (heads, columns) the levels refer to.
        num_levels: optional record of the top level (10, fewer for models with fewer than 10 heads), so that
            a pruned model re-opens with the levels it was pruned with (gradual pruning).
        mlp_level_split: optional record of how many MLP levels one level step spans (``None``: 1), with
            ``level_steps['mlp']`` the finer step.
    """

    model_type = 'darwinlm'

    def __init__(
        self,
        base_model_type='llama',
        layer_heads=None,
        layer_intermediate_sizes=None,
        qkv_bias=None,
        o_bias=None,
        levels=None,
        level_steps=None,
        num_levels=None,
        mlp_level_split=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.base_model_type = base_model_type
        self.qkv_bias = self.attention_bias if qkv_bias is None else bool(qkv_bias)
        self.o_bias = self.attention_bias if o_bias is None else bool(o_bias)
        n_layers = self.num_hidden_layers
        if layer_heads is None:
            layer_heads = [list(range(self.num_attention_heads)) for _ in range(n_layers)]
        if layer_intermediate_sizes is None:
            layer_intermediate_sizes = [self.intermediate_size] * n_layers
        self.layer_heads = [sorted(int(h) for h in heads) for heads in layer_heads]
        self.layer_intermediate_sizes = [int(s) for s in layer_intermediate_sizes]
        self.levels = levels
        self.level_steps = level_steps
        self.num_levels = num_levels
        self.mlp_level_split = mlp_level_split
        self._validate_shapes()

    @property
    def is_grouped_query(self):
        return self.num_key_value_heads != self.num_attention_heads

    def layer_kv(self, layer):
        """K/V heads a layer stores and, for each kept query head, the index of the K/V head it reads."""
        heads = self.layer_heads[layer]
        if not self.is_grouped_query:
            return len(heads), list(range(len(heads)))
        group = self.num_attention_heads // self.num_key_value_heads
        return self.num_key_value_heads, [h // group for h in heads]

    def _validate_shapes(self):
        n_layers = self.num_hidden_layers
        if len(self.layer_heads) != n_layers or len(self.layer_intermediate_sizes) != n_layers:
            raise ValueError(
                f'DarwinLMConfig: layer_heads ({len(self.layer_heads)}) and layer_intermediate_sizes '
                f'({len(self.layer_intermediate_sizes)}) must have one entry per layer ({n_layers}).')
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f'DarwinLMConfig: num_attention_heads={self.num_attention_heads} is not a multiple of '
                f'num_key_value_heads={self.num_key_value_heads}.')
        for layer, heads in enumerate(self.layer_heads):
            if len(set(heads)) != len(heads) or any(h < 0 or h >= self.num_attention_heads for h in heads):
                raise ValueError(
                    f'DarwinLMConfig: layer {layer} heads {heads} must be distinct indices in '
                    f'[0, {self.num_attention_heads}).')
        for layer, size in enumerate(self.layer_intermediate_sizes):
            if not 0 <= size <= self.intermediate_size:
                raise ValueError(
                    f'DarwinLMConfig: layer {layer} intermediate size {size} is outside '
                    f'[0, {self.intermediate_size}].')
