"""Physical structured shrinking: keep a subset of heads / MLP columns per unit and build a smaller model.

`shrink_model` and `build_shrunk_model` produce a `DarwinLMForCausalLM` whose matrices really are smaller;
`mask_model` is the research code's way (same shapes, pruned structures zeroed), kept as the reference the
shrunk model must equal and as the baseline of the speed benchmarks.
"""

import copy
from typing import Callable, Dict, Mapping, Optional, Sequence

import torch

from darwinlm_foundry.modeling import DarwinLMConfig, DarwinLMForCausalLM
from darwinlm_foundry.structure.families import family_of, family_traits
from darwinlm_foundry.structure.units import Unit, head_dim, layer_heads, layer_intermediate_size, prunable_units

# Fields of the dense config that describe the dense model's identity, not its shape.
_DROP_KEYS = ('model_type', 'architectures', 'auto_map', 'transformers_version', '_attn_implementation_autoset')


def to_darwinlm_config(config) -> DarwinLMConfig:
    """The DarwinLM config of a dense Llama/Mistral/Qwen2 config (nothing pruned yet), or a copy of one."""
    if getattr(config, 'model_type', None) == 'darwinlm':
        return copy.deepcopy(config)
    traits = family_traits(config)
    fields = {k: v for k, v in config.to_dict().items() if k not in _DROP_KEYS}
    fields.update(base_model_type=traits.family, qkv_bias=traits.qkv_bias, o_bias=traits.o_bias,
                  mlp_bias=traits.mlp_bias, attention_bias=traits.qkv_bias and traits.o_bias,
                  head_dim=head_dim(config))
    new = DarwinLMConfig(**fields)
    new._attn_implementation = config._attn_implementation
    return new


def _normalise_kept(config, kept: Mapping[Unit, Sequence[int]]) -> Dict[Unit, list]:
    sizes = {shape.unit: shape.num_structures for shape in prunable_units(config)}
    out = {}
    for unit, indices in kept.items():
        if not isinstance(unit, Unit):
            raise TypeError(f'kept keys must be darwinlm_foundry.structure.units.Unit, got {unit!r}.')
        if unit not in sizes:
            raise ValueError(f'{unit} does not exist: the model has {config.num_hidden_layers} layers.')
        idx = [int(i) for i in (indices.tolist() if torch.is_tensor(indices) else indices)]
        if len(set(idx)) != len(idx):
            dup = sorted({i for i in idx if idx.count(i) > 1})
            raise ValueError(f'{unit}: kept indices {dup} are duplicated.')
        bad = [i for i in idx if not 0 <= i < sizes[unit]]
        if bad:
            raise ValueError(f'{unit}: kept indices {bad} are out of range [0, {sizes[unit]}) '
                             f'(indices refer to the structures the model has now).')
        out[unit] = sorted(idx)
    return out


def shrunk_config(config, kept: Mapping[Unit, Sequence[int]]) -> DarwinLMConfig:
    """Config of the model after keeping ``kept`` (indices of current structures) in each listed unit."""
    kept = _normalise_kept(config, kept)
    new = to_darwinlm_config(config)
    for unit, idx in kept.items():
        if unit.kind == 'attn':
            current = layer_heads(config, unit.layer)
            new.layer_heads[unit.layer] = [current[i] for i in idx]
        else:
            new.layer_intermediate_sizes[unit.layer] = len(idx)
    new._validate_shapes()
    return new


def _rows(idx, size):
    """Row (or column) indices covered by structures ``idx`` of ``size`` rows each."""
    idx = torch.as_tensor(idx, dtype=torch.long)
    return (idx[:, None] * size + torch.arange(size)).reshape(-1)


def _check_output_weights(config, kept, output_weights):
    hd = head_dim(config)
    for unit, weight in (output_weights or {}).items():
        if unit not in kept:
            raise ValueError(f'output weight given for {unit}, which has no kept set.')
        cols = len(kept[unit]) * (hd if unit.kind == 'attn' else 1)
        expected = (config.hidden_size, cols)
        if tuple(weight.shape) != expected:
            raise ValueError(f'{unit}: replacement output weight has shape {tuple(weight.shape)}, expected '
                             f'{expected} (hidden_size x kept structures * structure size).')


def _optional(get_tensor, name):
    try:
        return get_tensor(name)
    except KeyError:
        return None


def _keep(out, get_tensor, prefix, projections, by_rows, index, replacement):
    """Load one unit's ``projections`` (weights and biases; absent ones stay None) into ``out`` and keep
    ``index``: rows of the ``by_rows`` projections, columns of the last one, the output matrix (or its OBS
    ``replacement``). ``index`` None keeps everything; no output matrix means the unit is already removed."""
    for proj in projections:
        for param in ('weight', 'bias'):
            out[f'{prefix}{proj}.{param}'] = _optional(get_tensor, f'{prefix}{proj}.{param}')
    output = f'{prefix}{projections[-1]}.weight'
    if index is None or out[output] is None:
        return
    for proj in by_rows:
        for param in ('weight', 'bias'):
            t = out[f'{prefix}{proj}.{param}']
            if t is not None:
                out[f'{prefix}{proj}.{param}'] = t.index_select(0, index)
    out[output] = replacement if replacement is not None else out[output].index_select(1, index)


def _unit_tensors(config, layer, kept_attn, kept_mlp, get_tensor, output_weights):
    """State-dict entries of one layer after keeping ``kept_attn`` heads / ``kept_mlp`` columns (None = all)."""
    prefix = f'model.layers.{layer}.'
    hd = head_dim(config)
    grouped = config.num_key_value_heads != config.num_attention_heads
    out = {}
    for name in ('input_layernorm.weight', 'post_attention_layernorm.weight'):
        out[prefix + name] = _optional(get_tensor, prefix + name)  # absent where the unit is already removed
    # kept heads: rows of q (and of k / v under plain multi-head attention; GQA keeps K/V whole), columns of
    # o_proj; kept MLP channels: rows of gate / up, columns of down_proj
    attn_rows = None if kept_attn is None else _rows(kept_attn, hd)
    mlp_cols = None if kept_mlp is None else torch.as_tensor(kept_mlp, dtype=torch.long)
    _keep(out, get_tensor, prefix + 'self_attn.', ('q_proj', 'k_proj', 'v_proj', 'o_proj'),
          ('q_proj',) if grouped else ('q_proj', 'k_proj', 'v_proj'), attn_rows,
          output_weights.get(Unit(layer, 'attn')))
    _keep(out, get_tensor, prefix + 'mlp.', ('gate_proj', 'up_proj', 'down_proj'), ('gate_proj', 'up_proj'),
          mlp_cols, output_weights.get(Unit(layer, 'mlp')))
    return {k: v for k, v in out.items() if v is not None}


def build_shrunk_model(config, get_tensor: Callable[[str], torch.Tensor],
                       kept: Mapping[Unit, Sequence[int]],
                       output_weights: Optional[Mapping[Unit, torch.Tensor]] = None) -> DarwinLMForCausalLM:
    """Build the shrunk model straight from a source model's tensors, materialising only what is kept.

    Args:
        config: config of the source model (dense Llama/Mistral/Qwen2 or DarwinLM).
        get_tensor: ``get_tensor(name)`` returns the source state-dict tensor ``name`` (HF naming) and raises
            ``KeyError`` for absent ones (biases). May read lazily, e.g. from memory-mapped safetensors.
        kept: per unit, indices of the *current* structures to keep (sorted internally; units not listed are
            unchanged; an empty set removes the unit).
        output_weights: per unit, a replacement output-matrix weight (``o_proj`` / ``down_proj``) of shape
            ``(hidden_size, len(kept) * structure_size)``, columns in sorted kept order (e.g. OBS-compensated).
    """
    family_of(config)
    kept = _normalise_kept(config, kept)
    output_weights = dict(output_weights or {})
    _check_output_weights(config, kept, output_weights)
    new_config = shrunk_config(config, kept)
    from transformers.modeling_utils import no_init_weights
    # every weight is assigned below: skip the random init (a third of the build time on a 30-layer model)
    with torch.device('meta'), no_init_weights():
        model = DarwinLMForCausalLM(new_config)
    state = {'model.embed_tokens.weight': get_tensor('model.embed_tokens.weight'),
             'model.norm.weight': get_tensor('model.norm.weight')}
    if not new_config.tie_word_embeddings:
        state['lm_head.weight'] = get_tensor('lm_head.weight')
    for layer in range(new_config.num_hidden_layers):
        state.update(_unit_tensors(config, layer, kept.get(Unit(layer, 'attn')), kept.get(Unit(layer, 'mlp')),
                     get_tensor, output_weights))
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if k in expected}  # drops tensors of removed units
    dtype = state['model.embed_tokens.weight'].dtype
    # Clone so the new model never aliases (or keeps memory-mapped) source storage.
    state = {k: v.detach().to(dtype).clone() for k, v in state.items()}
    missing = set(expected) - set(state) - ({'lm_head.weight'} if new_config.tie_word_embeddings else set())
    if missing:
        raise RuntimeError(f'source model lacks tensors {sorted(missing)[:5]}...')
    model.load_state_dict(state, strict=False, assign=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=new_config, device='cpu')
    if new_config.tie_word_embeddings:
        model.tie_weights()
    model.to(state['model.embed_tokens.weight'].device)
    model.config.torch_dtype = dtype
    return model.eval()


def state_dict_getter(model) -> Callable[[str], torch.Tensor]:
    """``get_tensor`` over an in-memory model's state dict."""
    state = model.state_dict()

    def get_tensor(name):
        if name not in state:
            raise KeyError(f'tensor {name} not in the model')
        return state[name]

    return get_tensor


def shrink_model(model, kept: Mapping[Unit, Sequence[int]],
                 output_weights: Optional[Mapping[Unit, torch.Tensor]] = None) -> DarwinLMForCausalLM:
    """A new, physically smaller `DarwinLMForCausalLM` keeping ``kept`` structures (the source is untouched)."""
    new = build_shrunk_model(model.config, state_dict_getter(model), kept, output_weights)
    new.train(model.training)
    return new


@torch.no_grad()
def mask_model(model, kept: Mapping[Unit, Sequence[int]],
               output_weights: Optional[Mapping[Unit, torch.Tensor]] = None):
    """A deep copy of ``model`` with the pruned structures zeroed in place (same shapes as the source).

    A unit with nothing kept also has its output bias zeroed, so it adds nothing to the residual, exactly
    like the removed unit of the shrunk model.
    """
    config = model.config
    kept = _normalise_kept(config, kept)
    output_weights = dict(output_weights or {})
    _check_output_weights(config, kept, output_weights)
    masked = copy.deepcopy(model)
    hd = head_dim(config)
    grouped = config.num_key_value_heads != config.num_attention_heads
    for unit, idx in kept.items():
        layer = masked.model.layers[unit.layer]
        if unit.kind == 'attn':
            attn, size = layer.self_attn, hd
            inputs = [attn.q_proj] + ([] if grouped else [attn.k_proj, attn.v_proj])
            out_proj, n = attn.o_proj, len(layer_heads(config, unit.layer))
        else:
            mlp, size = layer.mlp, 1
            inputs, out_proj, n = [mlp.gate_proj, mlp.up_proj], mlp.down_proj, layer_intermediate_size(config, unit.layer)
        if out_proj is None or n == 0:
            continue
        pruned = _rows(sorted(set(range(n)) - set(idx)), size)
        kept_cols = _rows(idx, size)
        for lin in inputs:
            lin.weight[pruned] = 0
            if lin.bias is not None:
                lin.bias[pruned] = 0
        out_proj.weight[:, pruned] = 0
        if unit in output_weights:
            out_proj.weight[:, kept_cols] = output_weights[unit].to(out_proj.weight.dtype)
        if not idx and out_proj.bias is not None:
            out_proj.bias.zero_()
    return masked


def parameter_count(config) -> int:
    """Closed-form parameter count of a dense or DarwinLM model from its config (tied embeddings once)."""
    c = to_darwinlm_config(config)
    hd, hidden = c.head_dim, c.hidden_size
    total = c.vocab_size * hidden + hidden  # embeddings + final norm
    if not c.tie_word_embeddings:
        total += c.vocab_size * hidden
    for layer in range(c.num_hidden_layers):
        nq = len(c.layer_heads[layer])
        if nq:
            nkv, _ = c.layer_kv(layer)
            total += hidden  # input norm
            total += (nq + 2 * nkv) * hd * (hidden + int(c.qkv_bias))
            total += nq * hd * hidden + hidden * int(c.o_bias)
        width = c.layer_intermediate_sizes[layer]
        if width:
            total += hidden  # post-attention norm
            total += 2 * width * (hidden + int(c.mlp_bias)) + width * hidden + hidden * int(c.mlp_bias)
    return total
