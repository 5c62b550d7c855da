"""Prunable units of a decoder: one attention unit (query heads) and one MLP unit (columns) per layer."""

from dataclasses import dataclass

from darwinlm_foundry.structure.families import family_of

KINDS = ('attn', 'mlp')


@dataclass(frozen=True, order=True)
class Unit:
    """One prunable unit: the attention (``'attn'``) or the MLP (``'mlp'``) of decoder layer ``layer``."""

    layer: int
    kind: str

    def __post_init__(self):
        if self.kind in ('kv', 'k_proj', 'v_proj', 'key_value'):
            raise ValueError(
                'K/V heads are not pruned on their own: under grouped-query attention K/V stay whole and each '
                'kept query head reads its original K/V group; under multi-head attention K/V follow the kept '
                f'query heads. Prune Unit({self.layer}, "attn") instead.')
        if self.kind not in KINDS:
            raise ValueError(f'Unit kind {self.kind!r} is not one of {KINDS}.')
        if not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f'Unit layer must be a non-negative int, got {self.layer!r}.')

    @property
    def output_module(self) -> str:
        """Name of the unit's output matrix (the one the OBS pass prunes by input columns)."""
        proj = 'self_attn.o_proj' if self.kind == 'attn' else 'mlp.down_proj'
        return f'model.layers.{self.layer}.{proj}'


@dataclass(frozen=True)
class UnitShape:
    """A unit with its current size: ``num_structures`` of ``structure_size`` output-matrix columns each."""

    unit: Unit
    num_structures: int
    structure_size: int


def layer_heads(config, layer: int) -> list:
    """Query heads (dense numbering) a layer currently keeps."""
    if getattr(config, 'model_type', None) == 'darwinlm':
        return list(config.layer_heads[layer])
    return list(range(config.num_attention_heads))


def layer_intermediate_size(config, layer: int) -> int:
    if getattr(config, 'model_type', None) == 'darwinlm':
        return config.layer_intermediate_sizes[layer]
    return config.intermediate_size


def head_dim(config) -> int:
    return getattr(config, 'head_dim', None) or config.hidden_size // config.num_attention_heads


def prunable_units(model_or_config) -> list:
    """Every layer's attention and MLP unit, in layer order (removed units have ``num_structures`` 0)."""
    config = getattr(model_or_config, 'config', model_or_config)
    family_of(config)
    shapes = []
    for layer in range(config.num_hidden_layers):
        shapes.append(UnitShape(Unit(layer, 'attn'), len(layer_heads(config, layer)), head_dim(config)))
        shapes.append(UnitShape(Unit(layer, 'mlp'), layer_intermediate_size(config, layer), 1))
    return shapes
