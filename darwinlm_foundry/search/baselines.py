"""Pruning baselines for the reproduction study, all at the level granularity of the search.

* :func:`magnitude_kept` -- uniform magnitude pruning without compensation: every unit keeps its
  largest-norm structures (heads / MLP channels), weights left as they are.
* :func:`unit_errors` + :func:`allocate_min_error` -- a ZipLM-like allocation: per-unit levels chosen to
  minimise the *sum of layer-wise OBS errors* of the database's compensated weights, at the uniform
  model's size. It sees only local errors (no end-to-end fitness), which is what DarwinLM's evolutionary
  search is compared against.
* :func:`block_influence` + :func:`layer_drop_config` -- ShortGPT (Men et al., 2024, "ShortGPT: Layers in
  Large Language Models are More Redundant Than You Expect"): drop the decoder layers whose output is most
  similar to their input.

Structure numbering follows :meth:`SparsityDatabase.kept <darwinlm_foundry.obs.database.SparsityDatabase.kept>`
and :func:`~darwinlm_foundry.structure.shrinking.shrink_model`: indices of the unit's *current* structures, i.e. of
the heads the model has now (0 .. current heads - 1) and of single MLP intermediate channels
(``LevelSpec.structure_size('mlp') == 1``; ``mlp_multiple`` only quantises the level step, it does not
group channels).

Needs torch only (no Composer).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping, Optional, Union

import torch

from darwinlm_foundry.obs.calibration import CalibrationBatch, HessianStat, unit_output_weight
from darwinlm_foundry.search.space import GROUPS, MAX_LEVEL, LevelConfig
from darwinlm_foundry.structure.levels import KINDS, LevelSpec
from darwinlm_foundry.structure.units import Unit, head_dim, prunable_units

__all__ = ['structure_scores', 'magnitude_kept', 'unit_errors', 'allocate_min_error', 'block_influence',
           'layer_drop_config']


# --------------------------------------------------------------------------------------------------
# Magnitude (uniform, no compensation)
# --------------------------------------------------------------------------------------------------
def _sq_rows(linear: torch.nn.Module, n: int, size: int) -> torch.Tensor:
    """Per structure: squared norm of its ``size`` output rows (weight and bias) of ``linear``."""
    w = linear.weight.detach().double().reshape(n, size, -1).pow(2).sum(dim=(1, 2))
    if linear.bias is not None:
        w = w + linear.bias.detach().double().reshape(n, size).pow(2).sum(dim=1)
    return w


def structure_scores(model, unit: Unit) -> torch.Tensor:
    """Magnitude score (float64, CPU) of each current structure of ``unit``: the sum of squares of every
    parameter that belongs to that structure alone.

    Head: its ``q_proj`` rows, its ``o_proj`` columns and, under plain multi-head attention only, its
    ``k_proj`` / ``v_proj`` rows (under grouped-query attention K/V are shared by a group of query heads and
    are never pruned, so they do not count). MLP channel: its ``gate_proj`` / ``up_proj`` rows and its
    ``down_proj`` column. Biases of those rows count too (they go with the structure when it is pruned);
    the output bias is shared and does not. A removed unit gives an empty tensor.
    """
    config = model.config
    layer = model.model.layers[unit.layer]
    if unit.kind == 'attn':
        attn = layer.self_attn
        if attn is None:
            return torch.zeros(0, dtype=torch.float64)
        hd = head_dim(config)
        n = attn.o_proj.weight.shape[1] // hd
        # Same MHA/GQA test as shrinking.py: under MHA, K/V rows follow the kept query heads.
        grouped = config.num_key_value_heads != config.num_attention_heads
        inputs = [attn.q_proj] + ([] if grouped else [attn.k_proj, attn.v_proj])
        out = attn.o_proj.weight.detach().double().reshape(-1, n, hd).pow(2).sum(dim=(0, 2))
        size = hd
    else:
        mlp = layer.mlp
        if mlp is None:
            return torch.zeros(0, dtype=torch.float64)
        n = mlp.down_proj.weight.shape[1]
        inputs = [mlp.gate_proj, mlp.up_proj]
        out = mlp.down_proj.weight.detach().double().pow(2).sum(dim=0)
        size = 1
    for linear in inputs:
        out = out + _sq_rows(linear, n, size)
    return out.cpu()


def magnitude_kept(model, level_spec: LevelSpec, levels) -> dict[Unit, list[int]]:
    """Uniform-magnitude baseline: per unit, the structures with the largest :func:`structure_scores`.

    ``levels``: a ``LevelConfig``, ``{'attn': [...], 'mlp': [...]}`` (or anything
    :func:`~darwinlm_foundry.structure.levels.normalise_levels` accepts). Every unit whose level differs from its
    current one keeps ``level_spec.keep(kind, level)`` structures, returned as a sorted list of indices of
    its current structures (empty: the unit is removed); units at their current level are left out. The
    result goes straight to :func:`~darwinlm_foundry.structure.shrinking.shrink_model` (no ``output_weights``: this
    baseline does no compensation). The classic magnitude baseline of structured-pruning papers (e.g. the
    "magnitude" rows of LLM-Pruner / ZipLM), here at exactly the sizes of the database's levels.
    """
    levels = level_spec.normalise(levels)
    shapes = {s.unit: s for s in prunable_units(model.config)}
    if len(shapes) != 2 * level_spec.num_layers:
        raise ValueError(f'the model has {len(shapes) // 2} layers, the level spec {level_spec.num_layers}')
    kept = {}
    for kind in KINDS:
        for layer, level in enumerate(levels[kind]):
            unit = Unit(layer, kind)
            current = level_spec.current_levels[kind][layer]
            if level == current:
                continue
            if level < current:
                raise ValueError(f'{unit}: level {level} is below its current level {current}; pruned '
                                 f'structures cannot be brought back')
            n = shapes[unit].num_structures
            if n != level_spec.keep(kind, current):
                raise ValueError(f'{unit}: the model has {n} structures but its current level {current} keeps '
                                 f'{level_spec.keep(kind, current)}; the level spec does not match the model')
            k = level_spec.keep(kind, level)
            scores = structure_scores(model, unit)
            # Stable descending sort: ties go to the lower index, so the result is deterministic.
            order = torch.sort(scores, descending=True, stable=True).indices[:k]
            kept[unit] = sorted(order.tolist())
    return kept


# --------------------------------------------------------------------------------------------------
# Layer-wise OBS errors and the min-error allocation (ZipLM-like)
# --------------------------------------------------------------------------------------------------
def _columns(kept: torch.Tensor, size: int) -> torch.Tensor:
    return (kept.long()[:, None] * size + torch.arange(size)).reshape(-1)


@torch.no_grad()
def unit_errors(database, hessians: Mapping[Unit, Union[HessianStat, torch.Tensor]],
                get_tensor: Union[Callable[[str], torch.Tensor], torch.nn.Module],
                device=None) -> dict[Unit, dict[int, float]]:
    """Layer-wise OBS error of every stored level of every unit of ``database``.

    With ``W`` the unit's current output matrix (``o_proj`` / ``down_proj``, out x in) and ``W'`` the
    database's compensated kept columns placed at the kept structures' columns of a zero matrix of W's
    shape, the error is ``trace((W - W') H (W - W')^T)`` with ``H = 2 X^T X / n`` the unit's (undampened)
    input Hessian -- i.e. ``2/n * sum_tokens ||x W^T - x W'^T||^2`` on the calibration activations. The
    unit's current level has error 0.0. This is the quantity the OBS solver minimises per unit, without
    its dampening.

    ``hessians``: ``{Unit: HessianStat or tensor}`` as from :func:`~darwinlm_foundry.obs.calibration.
    collect_hessians` on the model the database was built from. ``get_tensor``: dense tensors of that
    model (:func:`~darwinlm_foundry.obs.database.dense_tensor_getter`) or the model itself. ``device``: where to
    compute (default: where each Hessian is). A removed unit gets ``{current_level: 0.0}`` only.
    """
    spec = database.level_spec
    out: dict[Unit, dict[int, float]] = {}
    for unit in database.units:
        current = database.current_level(unit)
        errs = {current: 0.0}
        others = [lvl for lvl in database.levels(unit) if lvl != current]
        if others:
            if unit not in hessians:
                raise KeyError(f'no Hessian for {unit}; collect_hessians on the model the database was built from')
            H = hessians[unit]
            H = H.hessian if isinstance(H, HessianStat) else H
            dev = device if device is not None else H.device
            H = H.to(device=dev, dtype=torch.float64)
            if isinstance(get_tensor, torch.nn.Module):
                W = unit_output_weight(get_tensor, unit)
            else:
                W = get_tensor(f'{unit.output_module}.weight')
            W = W.to(device=dev, dtype=torch.float64)
            if H.shape != (W.shape[1], W.shape[1]):
                raise ValueError(f'{unit}: Hessian of shape {tuple(H.shape)} does not fit the output matrix '
                                 f'{tuple(W.shape)}')
            size = spec.structure_size(unit.kind)
            for level in others:
                kept = database.kept(unit, level)
                D = W.clone()  # D = W - W', with W' zero outside the kept columns
                if kept.numel():
                    cols = _columns(kept, size).to(dev)
                    D[:, cols] -= database.weight(unit, level).to(device=dev, dtype=torch.float64)
                # trace(D H D^T) without forming the out x out product.
                errs[level] = float(((D @ H) * D).sum().item())
        out[unit] = dict(sorted(errs.items()))
    return out


def _integer_total(num_layers: int, target_level: float) -> int:
    total = num_layers * target_level
    if abs(total - round(total)) > 1e-9:
        raise ValueError(f'num_layers * target_level = {num_layers} * {target_level} = {total} is not a whole '
                         f'number of levels')
    return int(round(total))


def allocate_min_error(errors: Mapping[Unit, Mapping[int, float]], num_layers: int, target_level: float,
                       max_level: Optional[int] | Mapping[str, int] = None, min_level: int = 0,
                       mlp_split: int = 1) -> LevelConfig:
    """Per-unit levels minimising the summed layer-wise error at the uniform model's level sums.

    In each group (``attn``, ``mlp``) separately, choose one level per unit in ``[min_level, max_level]``
    (``max_level`` default 10; callers should pass ``level_spec.max_exact_level(kind)`` so every config has
    exactly the uniform size) such that the levels sum to ``num_layers * target_level`` -- the uniform
    config's sum -- and ``sum_unit errors[unit][level]`` is minimal. A unit may only take levels present
    in ``errors[unit]`` (gradual mode: its database levels). Solved exactly by dynamic programming over
    (unit, level sum), O(layers * total * levels). This is the ZipLM-style allocation by local errors only
    (Kurtic et al., 2023), the baseline DarwinLM's search is meant to beat. Raises ``ValueError`` when no
    allocation exists. With finer MLP levels (``mlp_split``, ``LevelSpec.mlp_split``) ``target_level`` is nominal:
    the MLP group sums to ``num_layers * target_level * mlp_split``; ``max_level`` may then be given per group.
    """
    if num_layers < 1:
        raise ValueError(f'num_layers must be >= 1, got {num_layers}')
    scale = {g: int(mlp_split) if g == 'mlp' else 1 for g in GROUPS}
    if isinstance(max_level, Mapping):
        tops = {g: int(max_level[g]) for g in GROUPS}
    else:
        tops = {g: (MAX_LEVEL if max_level is None else int(max_level)) * scale[g] for g in GROUPS}
    result = {}
    for group in GROUPS:
        max_level = tops[group]
        if not 0 <= min_level <= max_level:
            raise ValueError(f'need 0 <= min_level <= max_level, got min_level={min_level}, max_level={max_level}')
        total = _integer_total(num_layers, target_level * scale[group])
        options = []
        for layer in range(num_layers):
            unit = Unit(layer, group)
            table = errors.get(unit, {})
            opts = [(int(lvl), float(err)) for lvl, err in sorted(table.items()) if min_level <= lvl <= max_level]
            if not opts:
                raise ValueError(f'{unit} has no error for any level in [{min_level}, {max_level}] (errors cover '
                                 f'levels {sorted(table)}); nothing can be allocated to it')
            if any(math.isnan(e) for _, e in opts):
                raise ValueError(f'{unit} has a NaN error')
            options.append(opts)
        lo = sum(o[0][0] for o in options)
        hi = sum(o[-1][0] for o in options)
        if not lo <= total <= hi:
            raise ValueError(f'{group}: level sum {total} (= {num_layers} * {target_level * scale[group]}) is infeasible; with the '
                             f'allowed levels the sum ranges over [{lo}, {hi}]')
        # best[s]: least error of the units so far with levels summing to s; choice[i][s]: unit i's level.
        inf = math.inf
        best = [0.0] + [inf] * total
        choice = []
        for opts in options:
            new = [inf] * (total + 1)
            pick = [-1] * (total + 1)
            for s, prev in enumerate(best):
                if prev == inf:
                    continue
                for lvl, err in opts:
                    t = s + lvl
                    if t > total:
                        break  # opts are sorted by level
                    if prev + err < new[t]:
                        new[t], pick[t] = prev + err, lvl
            best = new
            choice.append(pick)
        if best[total] == inf:  # inside [lo, hi] but unreachable: missing levels leave gaps
            raise ValueError(f'{group}: no allocation of the allowed levels sums to {total}')
        levels, s = [], total
        for pick in reversed(choice):
            levels.append(pick[s])
            s -= pick[s]
        result[group] = levels[::-1]
    return LevelConfig(**result)


# --------------------------------------------------------------------------------------------------
# ShortGPT: Block Influence and layer dropping
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def block_influence(model, batches: Iterable) -> list[float]:
    """ShortGPT Block Influence of every decoder layer (Men et al., 2024, eq. 1).

    ``BI_i = 1 - mean_tokens cos(h_in_i, h_out_i)``, with ``h_in`` / ``h_out`` the residual-stream hidden
    states entering and leaving decoder layer ``i``, averaged over every (non-padding) token of ``batches``
    (LongTensor ``input_ids`` (B, T), or dicts with ``input_ids`` and an optional ``attention_mask``). The
    states are taken with forward hooks on ``model.model.layers[i]``, not with ``output_hidden_states``:
    HF returns the last layer's output after the final norm. The model's train/eval mode is restored.
    """
    layers = model.model.layers
    sums = [0.0] * len(layers)
    count = [0]
    state = {'mask': None}

    def hook(i):
        def fn(module, args, kwargs, output):
            h_in = args[0] if args else kwargs['hidden_states']
            h_out = output[0] if isinstance(output, (tuple, list)) else output
            cos = torch.nn.functional.cosine_similarity(h_in.double(), h_out.double(), dim=-1)
            if state['mask'] is not None:
                cos = cos[state['mask']]
            sums[i] += float(cos.sum().item())
        return fn

    was_training = model.training
    model.eval()
    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        device = model.model.embed_tokens.weight.device
        for raw in batches:
            batch = CalibrationBatch.of(raw)
            ids = batch.input_ids.to(device)
            mask = None if batch.attention_mask is None else batch.attention_mask.to(device)
            state['mask'] = None if mask is None else mask.bool()
            count[0] += ids.numel() if mask is None else int(mask.bool().sum().item())
            model.model(input_ids=ids, attention_mask=mask, use_cache=False)  # base model: no logits needed
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if count[0] == 0:
        raise ValueError('no tokens: block_influence needs at least one non-padding token')
    return [1.0 - s / count[0] for s in sums]


def layer_drop_config(influence, target_level: float, max_level: int = MAX_LEVEL, mlp_split: int = 1) -> LevelConfig:
    """ShortGPT-style layer dropping with the uniform model's level sums.

    ``total = num_layers * target_level`` levels per group: the ``total // max_level`` layers with the
    lowest ``influence`` (ties: lower layer first) get ``max_level`` in both groups (dropped), the
    remainder ``total - max_level * (total // max_level)`` goes to the next-lowest-influence layer (both
    groups), every other layer stays at level 0. Per-group level sums equal ``uniform(L, target_level)``'s.

    Size: level 10 is a real drop only when ``LevelSpec.remainder(kind) == 0`` (e.g. a dense model with
    ``10 * step`` structures); then the dropped unit also loses what it pays for once -- its RMSNorm and,
    per :meth:`LevelSpec.removal_overhead`, under grouped-query attention its shared K/V projections and any
    output bias -- so the model is smaller than the uniform one by ``removal_overhead(kind)`` per dropped
    unit (only the norm weights for a bias-free MLP or MHA attention). When ``remainder > 0`` (e.g.
    Llama-2-7B: 2 of 32 heads, 128 of 11008 MLP columns at level 10), level 10 keeps that many structures
    and the size equals the uniform model's exactly, but the layer is not fully dropped. With finer MLP levels
    (``mlp_split``) levels are nominal: the MLP units get ``mlp_split`` times the attention units' levels.
    """
    influence = [float(v) for v in influence]
    n = len(influence)
    if n < 1:
        raise ValueError('influence must have one value per layer')
    if any(math.isnan(v) for v in influence):
        raise ValueError(f'influence contains NaN: {influence}')
    if not 1 <= max_level <= MAX_LEVEL:
        raise ValueError(f'max_level must be in 1..{MAX_LEVEL}, got {max_level}')
    if not 0 <= target_level <= max_level:
        raise ValueError(f'target_level {target_level} is outside [0, {max_level}]')
    total = _integer_total(n, target_level)
    drop, rest = divmod(total, max_level)
    order = sorted(range(n), key=lambda i: (influence[i], i))
    levels = [0] * n
    for i in order[:drop]:
        levels[i] = max_level
    if rest:
        levels[order[drop]] = rest
    return LevelConfig(attn=levels, mlp=[lvl * int(mlp_split) for lvl in levels])
