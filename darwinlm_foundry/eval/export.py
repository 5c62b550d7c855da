"""Export a pruned model as the final Hugging Face directory in the DarwinLM format.

:func:`export_pruned` writes, atomically (a temporary sibling directory renamed into place):

* ``model.safetensors`` (or shards) + ``config.json`` with every per-layer shape (``layer_heads``,
  ``layer_intermediate_sizes``), the levels and level steps when known, and the ``auto_map`` with the
  self-contained ``configuration_darwinlm.py`` / ``modeling_darwinlm.py`` (stock transformers loads it with
  ``trust_remote_code=True``, without this package);
* the tokenizer;
* ``README.md``: a model card with the per-layer levels, kept heads and MLP widths, the exact parameter
  count against the dense one, the base model and the data;
* ``darwinlm_export.json``: the card's numbers, machine-readable.

A dense Llama / Mistral / Qwen2 model is accepted too: it is converted with ``shrink_model(model, {})``
(nothing removed, identical outputs), so a dense baseline exports in the same format as the pruned models.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from darwinlm_foundry.structure.levels import KINDS, LevelSpec
from darwinlm_foundry.structure.shrinking import parameter_count, shrink_model
from darwinlm_foundry.utils.params import count_parameters

log = logging.getLogger(__name__)

__all__ = ['export_pruned', 'dense_parameter_count', 'model_card', 'EXPORT_INFO_FILE']

EXPORT_INFO_FILE = 'darwinlm_export.json'


def _is_darwinlm(model) -> bool:
    return getattr(model.config, 'model_type', None) == 'darwinlm'


def dense_parameter_count(config) -> int:
    """Parameters of the dense model a DarwinLM (or dense) config came from (every head and column kept)."""
    dense = copy.deepcopy(config)
    if getattr(dense, 'model_type', None) == 'darwinlm':
        dense.layer_heads = [list(range(dense.num_attention_heads)) for _ in range(dense.num_hidden_layers)]
        dense.layer_intermediate_sizes = [dense.intermediate_size] * dense.num_hidden_layers
    return parameter_count(dense)


def _resolve_levels(config, levels) -> tuple[Optional[dict], Optional[dict], Optional[int]]:
    """(levels, level steps, number of levels) of the model: checked against its shapes when given, derived
    when not."""
    try:
        spec = LevelSpec.from_config(config)
    except ValueError as err:
        spec = None
        reason = str(err)
    if levels is None:
        if spec is None:
            log.info('export: per-unit levels not derivable (%s); the card lists shapes only', reason)
            return None, None, None
        return {k: list(v) for k, v in spec.current_levels.items()}, spec.steps, spec.num_levels
    if spec is None:
        raise ValueError(f'levels were given but the model shapes are not on levels: {reason}')
    levels = spec.normalise(levels)
    for kind in KINDS:
        if list(spec.current_levels[kind]) != levels[kind]:
            raise ValueError(f'{kind} levels {levels[kind]} do not match the model, whose shapes are at levels '
                             f'{list(spec.current_levels[kind])} (steps {spec.steps}); pass the levels the '
                             f'model was built with, or none to derive them.')
    return levels, spec.steps, spec.num_levels


def model_card(config, *, params: int, dense_params: int, base_model: str, data_note: str,
               levels: Optional[Mapping[str, list]], extra: Optional[Mapping[str, Any]] = None,
               title: Optional[str] = None) -> str:
    """Markdown model card: sizes, base model, data and the per-layer table (levels, heads, MLP width)."""
    n_heads, width = config.num_attention_heads, config.intermediate_size
    lines = [
        '---', 'library_name: transformers', 'tags:', '- darwinlm', '- structured-pruning', '- pruned',
        f'base_model: {base_model}', '---', '',
        f'# {title or "DarwinLM pruned " + base_model}', '',
        f'Structurally pruned with DarwinLM (training-aware evolutionary search over per-layer sparsity levels) '
        f'from `{base_model}`. The weights are physically smaller: each layer keeps its own query heads and MLP '
        f'width (model type `darwinlm`, {config.base_model_type} family).', '',
        '| | parameters |', '|---|---:|',
        f'| this model | {params:,} ({params / dense_params:.2%} of dense) |',
        f'| dense `{base_model}` | {dense_params:,} |', '',
        f'**Parameter count:** {params:,}  ', f'**Dense parameter count:** {dense_params:,}  ',
        f'**Base model:** {base_model}  ', f'**Data:** {data_note}', '',
        '## Per-layer shapes', '',
        f'Dense: {n_heads} query heads x {config.head_dim} (K/V heads {config.num_key_value_heads}), MLP width '
        f'{width}. ' + (f'Levels 0 (dense) .. {config.num_levels}; level steps: {config.level_steps}' + (
            f'; the MLP in {config.mlp_level_split} levels per level (0 .. '
            f'{config.num_levels * config.mlp_level_split}).' if getattr(config, 'mlp_level_split', None) else '.')
                        if getattr(config, 'level_steps', None) and getattr(config, 'num_levels', None)
                        else 'Levels: n/a.'), '',
        '| layer | attn level | query heads kept | kept heads | MLP level | MLP width |',
        '|---:|---:|---:|---|---:|---:|',
    ]
    for i in range(config.num_hidden_layers):
        heads = config.layer_heads[i]
        la = levels['attn'][i] if levels else '-'
        lm = levels['mlp'][i] if levels else '-'
        kept = ', '.join(map(str, heads)) if heads else '(attention removed)'
        lines.append(f'| {i} | {la} | {len(heads)}/{n_heads} | {kept} | {lm} | '
                     f'{config.layer_intermediate_sizes[i]}/{width} |')
    lines += ['', '## Use', '', '```python', 'from transformers import AutoModelForCausalLM, AutoTokenizer',
              "model = AutoModelForCausalLM.from_pretrained('<this directory>', trust_remote_code=True)",
              "tokenizer = AutoTokenizer.from_pretrained('<this directory>')", '```', '',
              'The modelling code (`modeling_darwinlm.py`, `configuration_darwinlm.py`) ships with the weights; '
              'only `torch` and `transformers` are needed.']
    if extra:
        lines += ['', '## Notes', '']
        lines += [f'- **{k}:** {v}' for k, v in extra.items()]
    return '\n'.join(lines) + '\n'


def _load_tokenizer(tokenizer):
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(tokenizer))
    return tokenizer


def export_pruned(model, out_dir, *, tokenizer, base_model: str, data_note: str, levels=None,
                  dtype: Optional[torch.dtype] = None, extra: Optional[Mapping[str, Any]] = None,
                  overwrite: bool = False, title: Optional[str] = None) -> Path:
    """Write the final HF directory of ``model`` (DarwinLM, or dense and converted) to ``out_dir``.

    Args:
        model: a ``DarwinLMForCausalLM`` (pruned) or a dense HF Llama / Mistral / Qwen2 model (converted
            with ``shrink_model(model, {})``). Never modified.
        tokenizer: a tokenizer or a path loadable by ``AutoTokenizer``; saved beside the weights.
        base_model: name of the dense model it came from (card, ``base_model`` metadata).
        data_note: what data calibrated / searched / trained it (card).
        levels: per-unit levels (``{'attn': [...], 'mlp': [...]}``, ``{Unit: level}`` or a ``LevelConfig``);
            checked against the model's shapes. ``None``: derived from the shapes when they sit on levels.
        dtype: save in this dtype (e.g. ``torch.bfloat16``); default: the model's.
        extra: more key/values for the card's notes and ``darwinlm_export.json``.
        overwrite: replace an existing ``out_dir`` (the swap is rename-based, never a half-written directory).

    Returns the output path. The directory appears complete or not at all.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f'{out_dir} exists; pass overwrite=True to replace it or choose another directory.')
    if not _is_darwinlm(model):
        log.info('export: dense %s model converted to the DarwinLM format (nothing removed)',
                 getattr(model.config, 'model_type', '?'))
        model = shrink_model(model, {})  # a new model: the caller's stays untouched
    elif dtype is not None and next(model.parameters()).dtype != dtype:
        model = copy.deepcopy(model)
    if dtype is not None:
        model = model.to(dtype)
    config = model.config
    levels, steps, num_levels = _resolve_levels(config, levels)
    params = count_parameters(model)
    expected = parameter_count(config)
    if params != expected:
        raise RuntimeError(f'model holds {params:,} parameters but its config describes {expected:,}; the model '
                           'and its config disagree (was a module replaced without updating the config?).')
    dense_params = dense_parameter_count(config)
    tokenizer = _load_tokenizer(tokenizer)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f'.{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}'
    saved = config.levels, config.level_steps, config.num_levels
    try:
        config.levels, config.level_steps, config.num_levels = levels, steps, num_levels  # in config.json
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        info = {'base_model': base_model, 'data': data_note, 'parameters': params,
                'dense_parameters': dense_params, 'fraction_of_dense': params / dense_params,
                'levels': levels, 'level_steps': steps, 'num_levels': num_levels,
                'mlp_level_split': getattr(config, 'mlp_level_split', None) or 1,
                'layer_heads': config.layer_heads, 'layer_intermediate_sizes': config.layer_intermediate_sizes,
                'dtype': str(next(model.parameters()).dtype).replace('torch.', ''), 'extra': dict(extra or {})}
        (tmp / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2, default=str) + '\n', encoding='utf-8')
        (tmp / 'README.md').write_text(model_card(config, params=params, dense_params=dense_params,
                                                  base_model=base_model, data_note=data_note, levels=levels,
                                                  extra=extra, title=title), encoding='utf-8')
        if out_dir.exists():
            old = out_dir.parent / f'.{out_dir.name}.old-{uuid.uuid4().hex[:8]}'
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        config.levels, config.level_steps, config.num_levels = saved
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
