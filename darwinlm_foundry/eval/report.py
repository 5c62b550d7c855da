"""Run report: ``report.md`` + ``report.json`` with the same numbers, and PNG plots (matplotlib, Agg).

:func:`write_report` takes plain data (sizes, per-layer shapes / levels, fitness history, eval table,
speed-ups) so any stage can produce it; the markdown is generated from the JSON document, so every number
in the markdown is the JSON value formatted (``report.json`` is the source of truth).

Plots: ``layers.png`` (heads and MLP width kept per layer) and ``fitness.png`` (fitness over generations: one
curve per search stage, from :func:`search_curve`, using the probe fitness -- the parent scored on the same
fixed sample every generation -- where the search recorded it).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from darwinlm_foundry.utils.io import atomic_write_json, atomic_write_text

__all__ = ['write_report', 'render_markdown', 'fmt_number', 'fmt_params', 'search_curve']

REPORT_MD, REPORT_JSON, LAYERS_PNG, FITNESS_PNG = 'report.md', 'report.json', 'layers.png', 'fitness.png'


def fmt_params(n: int) -> str:
    """Parameter count as the paper prints it (6.7B, 2.6B, 45.8M, 120K)."""
    for scale, suffix in ((1e9, 'B'), (1e6, 'M'), (1e3, 'K')):
        if abs(n) >= scale:
            return f'{n / scale:.1f}{suffix}'
    return str(int(n))


def fmt_number(x: Any, digits: int = 4) -> str:
    """A table cell: ints with thousands separators, floats with ``digits`` decimals, others as str."""
    if isinstance(x, bool) or x is None:
        return '-' if x is None else str(x)
    if isinstance(x, int):
        return f'{x:,}'
    if isinstance(x, float):
        return 'nan' if math.isnan(x) else f'{x:.{digits}f}'
    return str(x)


def _eval_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    tasks = []
    for row in rows:
        for task in row.get('tasks', {}):
            if task not in tasks:
                tasks.append(task)
    return tasks


def _normalise_eval(eval_table: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Rows ``{method, params, tasks: {task: acc}, avg}``; ``avg`` (mean over the row's tasks) filled in."""
    rows = []
    for row in eval_table:
        if 'method' not in row or 'tasks' not in row:
            raise ValueError(f'eval_table rows need "method" and "tasks" (and optionally "params", "avg"); '
                             f'got keys {sorted(row)}')
        tasks = {k: float(v) for k, v in row['tasks'].items()}
        avg = row.get('avg')
        if avg is None:
            avg = sum(tasks.values()) / len(tasks) if tasks else float('nan')
        rows.append({'method': str(row['method']), 'params': row.get('params'), 'tasks': tasks,
                     'avg': float(avg)})
    return rows


def _layers(levels: Mapping[str, Any]) -> dict:
    """Per-layer section: kept heads / MLP widths (required) with dense sizes and optional levels."""
    need = ('heads', 'mlp_width')
    missing = [k for k in need if k not in levels]
    if missing:
        raise ValueError(f'levels needs {need} per layer (and optionally "attn", "mlp" levels, '
                         f'"dense_heads", "dense_mlp_width"); missing {missing}')
    out = {'heads': [int(v) for v in levels['heads']], 'mlp_width': [int(v) for v in levels['mlp_width']]}
    if len(out['heads']) != len(out['mlp_width']):
        raise ValueError('levels: heads and mlp_width must have one entry per layer each')
    for key in ('attn', 'mlp'):
        if levels.get(key) is not None:
            out[key] = [int(v) for v in levels[key]]
    for key in ('dense_heads', 'dense_mlp_width'):
        if levels.get(key) is not None:
            out[key] = int(levels[key])
    return out


def layers_from_config(config) -> dict:
    """The ``levels`` argument of :func:`write_report` from a DarwinLM (or dense) config (levels from
    ``config.levels``, else derived from the shapes when they sit on levels, else left out)."""
    n = config.num_hidden_layers
    if getattr(config, 'model_type', None) == 'darwinlm':
        heads = [len(h) for h in config.layer_heads]
        widths = list(config.layer_intermediate_sizes)
        levels = config.levels or {}
    else:
        heads, widths, levels = [config.num_attention_heads] * n, [config.intermediate_size] * n, {}
    if not levels:
        try:  # derive the levels from the shapes when they sit on levels
            from darwinlm_foundry.structure.levels import LevelSpec
            levels = {k: list(v) for k, v in LevelSpec.from_config(config).current_levels.items()}
        except ValueError:
            levels = {}
    return {'heads': heads, 'mlp_width': widths, 'attn': levels.get('attn'), 'mlp': levels.get('mlp'),
            'dense_heads': config.num_attention_heads, 'dense_mlp_width': config.intermediate_size}


def render_markdown(doc: Mapping[str, Any]) -> str:
    """The markdown report of a report document (what ``report.json`` holds)."""
    lines = [f'# {doc["title"]}', '']
    sizes = doc['sizes']
    if sizes:
        lines += ['## Sizes', '', '| model | parameters |', '|---|---:|']
        lines += [f'| {name} | {fmt_number(v)} |' for name, v in sizes.items()]
        lines.append('')
    rows = doc['eval_table']
    if rows:
        tasks = _eval_columns(rows)
        lines += ['## Evaluation', '', '| method | params | ' + ' | '.join(tasks) + ' | avg |',
                  '|---|---:|' + '---:|' * (len(tasks) + 1)]
        for row in rows:
            params = fmt_params(row['params']) if isinstance(row['params'], int) else fmt_number(row['params'])
            cells = [fmt_number(row['tasks'].get(t)) for t in tasks]
            lines.append(f'| {row["method"]} | {params} | ' + ' | '.join(cells) + f' | {fmt_number(row["avg"])} |')
        lines.append('')
    layers = doc['layers']
    lines += ['## Per-layer shapes', '', f'![heads and MLP width per layer]({LAYERS_PNG})', '',
              '| layer | attn level | heads kept | MLP level | MLP width |', '|---:|---:|---:|---:|---:|']
    for i, (h, w) in enumerate(zip(layers['heads'], layers['mlp_width'])):
        la = fmt_number(layers['attn'][i]) if 'attn' in layers else '-'
        lm = fmt_number(layers['mlp'][i]) if 'mlp' in layers else '-'
        lines.append(f'| {i} | {la} | {fmt_number(h)} | {lm} | {fmt_number(w)} |')
    lines.append('')
    history = doc['fitness_history']
    curves = doc.get('fitness_curves') or []
    if curves:
        # one column per search; rows: every generation any of them has
        lines += ['## Search', '', f'![fitness over generations]({FITNESS_PNG})', '']
        lines += [f'- {c["label"]}: {_CURVE_KINDS[c["kind"]]}' for c in curves]
        lines += ['', '| generation | ' + ' | '.join(f'{c["label"]} {c["kind"]}' for c in curves) + ' |',
                  '|---:|' + '---:|' * len(curves)]
        by_curve = [{p['generation']: p['fitness'] for p in c['points']} for c in curves]
        for g in sorted({g for points in by_curve for g in points}):
            lines.append(f'| {fmt_number(g)} | ' + ' | '.join(fmt_number(points.get(g), 6) for points in by_curve)
                         + ' |')
        lines.append('')
    elif history:
        lines += ['## Search', '', f'![fitness over generations]({FITNESS_PNG})', '',
                  '| generation | fitness |', '|---:|---:|']
        lines += [f'| {fmt_number(g["generation"])} | {fmt_number(g["fitness"], 6)} |' for g in history]
        lines.append('')
    speedups = doc['speedups']
    if speedups:
        keys = []
        for row in speedups:
            keys += [k for k in row if k not in keys]
        lines += ['## Speed', '', '| ' + ' | '.join(keys) + ' |', '|' + '---|' * len(keys)]
        lines += ['| ' + ' | '.join(fmt_number(row.get(k), 2) for k in keys) + ' |' for row in speedups]
        lines.append('')
    return '\n'.join(lines)


def _history(fitness_history) -> list[dict]:
    """``[{generation, fitness}]`` from a list of numbers or of dicts with those keys."""
    out = []
    for i, item in enumerate(fitness_history or []):
        if isinstance(item, Mapping):
            out.append({'generation': int(item.get('generation', i)), 'fitness': float(item['fitness'])})
        else:
            out.append({'generation': i, 'fitness': float(item)})
    return out


_CURVE_KINDS = {
    'probe': 'probe fitness: the parent scored on one fixed sample every generation (comparable across '
             'generations; generation 0 = the start configuration)',
    'fitness': 'fitness of the winner in the last selection step, each generation on a fresh sample (this search '
               'recorded no probe fitness)',
}


def search_curve(search: Mapping[str, Any]) -> dict:
    """The fitness curve of one search from its ``winner.json`` data: ``{kind, points: [{generation,
    fitness}]}`` with ``generation`` = generations completed. ``kind`` is ``'probe'`` when every generation
    recorded a probe fitness (then the start's probe fitness is generation 0 when recorded), else
    ``'fitness'`` (the last-step fitness on fresh samples; ``winner.json`` files from before the probe)."""
    records = list(search.get('history') or [])
    if records and all(r.get('probe_fitness') is not None for r in records):
        points = [{'generation': int(r['generation']) + 1, 'fitness': float(r['probe_fitness'])} for r in records]
        if search.get('start_probe_fitness') is not None:
            points.insert(0, {'generation': 0, 'fitness': float(search['start_probe_fitness'])})
        return {'kind': 'probe', 'points': points}
    if not records and search.get('start_probe_fitness') is not None:  # 0 generations: the start alone
        return {'kind': 'probe', 'points': [{'generation': 0, 'fitness': float(search['start_probe_fitness'])}]}
    if records:
        points = [{'generation': int(r['generation']) + 1, 'fitness': float(r['fitness'])} for r in records]
    else:
        points = [{'generation': i + 1, 'fitness': float(f)} for i, f in enumerate(search.get('fitness_history') or [])]
    return {'kind': 'fitness', 'points': points}


def _curves(fitness_curves) -> list[dict]:
    """``[{label, kind, points}]`` from ``{label: curve or winner.json data}`` (or a list of labelled curves)."""
    items = fitness_curves.items() if isinstance(fitness_curves, Mapping) else (
        (c['label'], c) for c in fitness_curves)
    out = []
    for label, curve in items:
        if 'points' not in curve:
            curve = search_curve(curve)
        if curve['kind'] not in _CURVE_KINDS:
            raise ValueError(f'fitness curve {label!r}: kind must be one of {sorted(_CURVE_KINDS)}, '
                             f'got {curve["kind"]!r}')
        out.append({'label': str(label), 'kind': curve['kind'],
                    'points': [{'generation': int(p['generation']), 'fitness': float(p['fitness'])}
                               for p in curve['points']]})
    return out


def _plot_layers(layers: Mapping[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    n = len(layers['heads'])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, key, dense_key, label in ((axes[0], 'heads', 'dense_heads', 'query heads kept'),
                                      (axes[1], 'mlp_width', 'dense_mlp_width', 'MLP width kept')):
        ax.bar(range(n), layers[key], color='tab:blue' if key == 'heads' else 'tab:orange')
        if dense_key in layers:
            ax.axhline(layers[dense_key], color='gray', linestyle='--', linewidth=1, label='dense')
            ax.legend(loc='lower right')
        ax.set_xlabel('layer')
        ax.set_ylabel(label)
        ax.set_title(label)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_fitness(curves: Sequence[Mapping[str, Any]], path: Path) -> None:
    """One line per curve (``{label, kind, points}``); probe curves solid, fresh-sample ones dashed."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for curve in curves:
        points = curve['points']
        label = curve.get('label')
        if label is not None and curve.get('kind') == 'fitness' and len(curves) > 1:
            label += ' (fresh samples)'
        ax.plot([p['generation'] for p in points], [p['fitness'] for p in points], marker='.', label=label,
                linestyle='--' if curve.get('kind') == 'fitness' and len(curves) > 1 else '-')
    if any(c.get('label') is not None for c in curves):
        ax.legend()
    ax.set_xlabel('generation')
    ax.set_ylabel('fitness (KL to dense, lower is better)')
    probe = any(c.get('kind') == 'probe' for c in curves)
    ax.set_title('fitness of the parent over generations' + (' (fixed probe sample)' if probe else ''))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(out_dir, *, sizes: Mapping[str, int], levels: Mapping[str, Any],
                 fitness_history: Sequence[Any] = (), eval_table: Sequence[Mapping[str, Any]] = (),
                 speedups: Sequence[Mapping[str, Any]] = (), title: str = 'DarwinLM run report',
                 extra: Optional[Mapping[str, Any]] = None,
                 fitness_curves: Optional[Union[Mapping[str, Any], Sequence[Mapping[str, Any]]]] = None
                 ) -> dict[str, Path]:
    """Write ``report.md``, ``report.json``, ``layers.png`` and (with a history) ``fitness.png``.

    Args:
        sizes: ``{model name: parameter count}``, e.g. dense / uniform / searched.
        levels: per-layer ``heads`` and ``mlp_width`` kept (lists), optionally ``attn`` / ``mlp`` levels and
            ``dense_heads`` / ``dense_mlp_width`` (see :func:`layers_from_config`).
        fitness_history: fitness of the parent per generation (numbers or ``{generation, fitness}``): one
            unlabelled curve (use ``fitness_curves`` for several searches).
        fitness_curves: one curve per search, ``{label (e.g. the stage name): winner.json data}`` (turned into
            a curve by :func:`search_curve`: probe fitness where recorded) or ``{label: {kind, points}}``; drawn
            as one line each in ``fitness.png`` and written to ``report.json`` under ``fitness_curves``.
        eval_table: rows ``{method, params, tasks: {task: accuracy}, avg?}`` in the paper's layout (dense and
            uniform rows first, by convention); ``avg`` defaults to the mean of the row's tasks.
        speedups: rows of any flat keys, e.g. ``{workload, level, ideal, speedup}``.
    Returns the written paths by name.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {'title': title, 'sizes': {k: int(v) for k, v in sizes.items()}, 'layers': _layers(levels),
           'fitness_history': _history(fitness_history), 'eval_table': _normalise_eval(eval_table),
           'speedups': [dict(r) for r in speedups], 'extra': dict(extra or {})}
    if fitness_curves:
        doc['fitness_curves'] = _curves(fitness_curves)
    paths = {'json': out_dir / REPORT_JSON, 'markdown': out_dir / REPORT_MD, 'layers_png': out_dir / LAYERS_PNG}
    _plot_layers(doc['layers'], paths['layers_png'])
    curves = [c for c in doc.get('fitness_curves', []) if c['points']]
    if not curves and doc['fitness_history']:
        curves = [{'label': None, 'kind': 'fitness', 'points': doc['fitness_history']}]
    if curves:
        paths['fitness_png'] = out_dir / FITNESS_PNG
        _plot_fitness(curves, paths['fitness_png'])
    atomic_write_json(paths['json'], doc, indent=2, newline=True)
    atomic_write_text(paths['markdown'], render_markdown(doc))
    return paths
