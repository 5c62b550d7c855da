"""Physical structured shrinking: keep a subset of heads / MLP columns per unit and build a smaller model.

`shrink_model` and `build_shrunk_model` produce a `DarwinLMForCausalLM` whose matrices really are smaller;
`mask_model` is the research code's way (same shapes, pruned structures zeroed), kept as the reference the
shrunk model must equal and as the baseline of the speed benchmarks.
"""

import copy
from typing import Callable, Dict, Mapping, Optional, Sequence

import torch

from darwinlm_foundry.modeling import DarwinLMConfig, DarwinLMForCausalLM
from darwinlm_foundry.modeling.modeling_darwinlm import DarwinLMAttention, DarwinLMDecoderLayer, DarwinLMMLP
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
        idx = sorted(int(i) for i in (indices.tolist() if torch.is_tensor(indices) else indices))
        size = sizes[unit]
        if any(a == b for a, b in zip(idx, idx[1:])):
            dup = sorted({a for a, b in zip(idx, idx[1:]) if a == b})
            raise ValueError(f'{unit}: kept indices {dup} are duplicated.')
        if idx and (idx[0] < 0 or idx[-1] >= size):  # sorted: the ends are the extremes
            bad = [i for i in idx if not 0 <= i < size]
            raise ValueError(f'{unit}: kept indices {bad} are out of range [0, {size}) '
                             f'(indices refer to the structures the model has now).')
        out[unit] = idx
    return out


def shrunk_config(config, kept: Mapping[Unit, Sequence[int]]) -> DarwinLMConfig:
    """Config of the model after keeping ``kept`` (indices of current structures) in each listed unit."""
    return _shrunk_config(config, _normalise_kept(config, kept))


def _shrunk_config(config, kept: Dict[Unit, list]) -> DarwinLMConfig:
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


def _keep(out, get_tensor, prefix, projections, by_rows, index, replacement, fresh):
    """Load one unit's ``projections`` (weights and biases; absent ones stay None) into ``out`` and keep
    ``index``: rows of the ``by_rows`` projections, columns of the last one, the output matrix (or its OBS
    ``replacement``). ``index`` None keeps everything; no output matrix means the unit is already removed.
    Names whose tensor ``index_select`` made here (new memory) are added to ``fresh``."""
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
                fresh.add(f'{prefix}{proj}.{param}')
    if replacement is not None:
        out[output] = replacement
    else:
        out[output] = out[output].index_select(1, index)
        fresh.add(output)


def _unit_state(config, unit: Unit, kept, get_tensor, output_weight, fresh) -> dict:
    """State-dict entries (full names) of one unit after keeping ``kept`` heads / MLP columns (None = all): its
    norm and projections; absent tensors (biases, an already removed unit) left out."""
    prefix = f'model.layers.{unit.layer}.'
    out = {}
    if unit.kind == 'attn':
        out[prefix + 'input_layernorm.weight'] = _optional(get_tensor, prefix + 'input_layernorm.weight')
        # kept heads: rows of q (and of k / v under plain multi-head attention; GQA keeps K/V whole), columns
        # of o_proj
        grouped = config.num_key_value_heads != config.num_attention_heads
        _keep(out, get_tensor, prefix + 'self_attn.', ('q_proj', 'k_proj', 'v_proj', 'o_proj'),
              ('q_proj',) if grouped else ('q_proj', 'k_proj', 'v_proj'),
              None if kept is None else _rows(kept, head_dim(config)), output_weight, fresh)
    else:
        # kept MLP channels: rows of gate / up, columns of down_proj
        out[prefix + 'post_attention_layernorm.weight'] = _optional(get_tensor,
                                                                    prefix + 'post_attention_layernorm.weight')
        _keep(out, get_tensor, prefix + 'mlp.', ('gate_proj', 'up_proj', 'down_proj'), ('gate_proj', 'up_proj'),
              None if kept is None else torch.as_tensor(kept, dtype=torch.long), output_weight, fresh)
    return {k: v for k, v in out.items() if v is not None}


def _owned(state: dict, fresh: set, dtype) -> dict:
    """``state`` in ``dtype``, sharing no storage with the source or the caller: what came straight from them is
    copied; what ``index_select`` or a dtype cast made here is already new memory."""
    out = {}
    for name, tensor in state.items():
        t = tensor.detach().to(dtype)
        out[name] = t if name in fresh or t.dtype != tensor.dtype else t.clone()
    return out


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
    new_config = _shrunk_config(config, kept)
    from transformers.modeling_utils import no_init_weights
    # every weight is assigned below: skip the random init (a third of the build time on a 30-layer model)
    with torch.device('meta'), no_init_weights():
        model = DarwinLMForCausalLM(new_config)
    state = {'model.embed_tokens.weight': get_tensor('model.embed_tokens.weight'),
             'model.norm.weight': get_tensor('model.norm.weight')}
    if not new_config.tie_word_embeddings:
        state['lm_head.weight'] = get_tensor('lm_head.weight')
    fresh = set()
    for layer in range(new_config.num_hidden_layers):
        for kind in ('attn', 'mlp'):
            unit = Unit(layer, kind)
            state.update(_unit_state(config, unit, kept.get(unit), get_tensor, output_weights.get(unit), fresh))
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if k in expected}  # drops tensors of removed units
    dtype = state['model.embed_tokens.weight'].dtype
    state = _owned(state, fresh, dtype)  # the new model never aliases (or keeps memory-mapped) source storage
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


def build_unit_modules(config, new_config: DarwinLMConfig, unit: Unit, get_tensor: Callable[[str], torch.Tensor],
                       kept: Optional[Sequence[int]], output_weight: Optional[torch.Tensor] = None, dtype=None):
    """One unit of the shrunk model built alone, as ``(module, norm)``: the attention (or MLP) keeping ``kept``
    (None: everything; empty: the unit is removed and both are None) and its pre-norm.

    ``config``: the source model's config (``get_tensor`` reads its tensors); ``new_config``: the shrunk model's,
    whose entry for this unit (``layer_heads`` / ``layer_intermediate_sizes``) already says what is kept. Same
    tensors as :func:`build_shrunk_model` gives that unit.
    """
    from transformers.modeling_utils import no_init_weights
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    if kept is not None and len(kept) == 0:
        return None, None
    fresh = set()
    state = _unit_state(config, unit, kept, get_tensor, output_weight, fresh)
    prefix = f'model.layers.{unit.layer}.'
    norm_name = prefix + ('input_layernorm.weight' if unit.kind == 'attn' else 'post_attention_layernorm.weight')
    if len(state) <= 1:  # only a norm or nothing: removed in the source already
        return None, None
    state = _owned(state, fresh, dtype or next(iter(state.values())).dtype)
    with torch.device('meta'), no_init_weights():
        if unit.kind == 'attn':
            module = DarwinLMAttention(new_config, unit.layer, 0)
        else:
            module = DarwinLMMLP(new_config, new_config.layer_intermediate_sizes[unit.layer])
        norm = LlamaRMSNorm(new_config.hidden_size, eps=new_config.rms_norm_eps)
    norm.load_state_dict({'weight': state.pop(norm_name)}, assign=True)
    cut = len(prefix + ('self_attn.' if unit.kind == 'attn' else 'mlp.'))
    module.load_state_dict({k[cut:]: v for k, v in state.items()}, assign=True)
    return module.eval(), norm.eval()


def _shallow_module(module: torch.nn.Module) -> torch.nn.Module:
    """A new module object with ``module``'s attributes, parameters and submodules (the same objects: shared)."""
    new = module.__class__.__new__(module.__class__)
    new.__dict__ = dict(module.__dict__)
    for registry in ('_parameters', '_buffers', '_modules'):
        new.__dict__[registry] = dict(module.__dict__[registry])
    return new


def assemble_shrunk_model(template: DarwinLMForCausalLM, config: DarwinLMConfig,
                          units: Mapping[Unit, tuple]) -> DarwinLMForCausalLM:
    """A shrunk model made of existing parts, copying no tensor: ``template``'s embedding, final norm, LM head and
    rotary embedding, and per unit the ``(module, norm)`` in ``units`` (every unit of the model; ``(None,
    None)``: removed), e.g. from :func:`build_unit_modules` or the layers of earlier models.

    For scoring many related models (the offspring of one selection step, which differ from each other in a few
    units) without building each whole. The parts stay shared, so the result must not be trained. Each call
    renumbers the shared attention modules' KV-cache slots for this model (removed layers take none), so only
    the most recent assembled model may run with a KV cache.
    """
    layers, slot = [], 0
    for layer in range(config.num_hidden_layers):
        attn, attn_norm = units[Unit(layer, 'attn')]
        mlp, mlp_norm = units[Unit(layer, 'mlp')]
        shell = DarwinLMDecoderLayer.__new__(DarwinLMDecoderLayer)
        torch.nn.Module.__init__(shell)
        shell.hidden_size = config.hidden_size
        shell.self_attn, shell.input_layernorm = attn, attn_norm
        shell.mlp, shell.post_attention_layernorm = mlp, mlp_norm
        if attn is not None:
            attn.layer_idx = slot
            slot += 1
        layers.append(shell)
    inner = _shallow_module(template.model)
    inner.layers = torch.nn.ModuleList(layers)
    inner.config = config
    model = _shallow_module(template)
    model.model = inner
    model.config = config
    return model


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
