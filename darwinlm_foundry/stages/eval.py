"""The `eval` and `export` run stages: held-out perplexity / KL side by side, foundry ICL tasks, export, report."""

import json
import os
import time
from pathlib import Path

from darwinlm_foundry.utils.io import atomic_write_json
from darwinlm_foundry.utils.params import count_parameters

EMBEDDED_ICL = Path(__file__).parent.parent / 'assets' / 'icl'


def _heldout_tokens(shards: str, n: int):
    from darwinlm_foundry.data.loaders import sample_sequences
    from darwinlm_foundry.data.shards import read_manifest
    seq_len = read_manifest(shards)['seq_len']
    return sample_sequences(os.path.join(shards, 'heldout'), n, seq_len, seed=1234)


def run_eval_stage(cfg, stage_dir, refs, run, outputs):
    """Held-out ppl and KL(dense || model) for every listed model; ICL accuracy through foundry's gauntlet."""
    from darwinlm_foundry.utils.dist import run_on_rank_zero

    paths = {label: refs[f'models.{label}']['model'] for label in cfg.models}
    dense = cfg.dense or next(iter(cfg.models))  # a label of `models` (checked with the chain, before any stage)
    out_path = os.path.join(stage_dir, 'eval.json')
    run_on_rank_zero('darwinlm_foundry.stages.eval:evaluate_models', dict(paths=paths, dense=dense, shards=refs['data']['shards'],
                                      heldout_sequences=cfg.heldout_sequences, icl=cfg.icl, stage_dir=stage_dir,
                                      out_path=out_path, by_source=cfg.heldout_by_source, lm_eval=cfg.lm_eval))
    return {'report': os.path.abspath(out_path)}


def _heldout_by_source(shards: str, tokenizer, n: int) -> dict:
    """Held-out token sequences per source file (domain): the held-out split's documents, packed per source."""
    import torch

    from darwinlm_foundry.data.shards import pack_documents, read_manifest, split_texts_by_source
    seq_len = read_manifest(shards)['seq_len']
    out = {}
    for name, texts in sorted(split_texts_by_source(shards, 'heldout').items()):
        rows = pack_documents(tokenizer, texts, seq_len, max_sequences=n)
        if len(rows):  # a domain with less than one sequence of held-out text is left out
            out[name] = torch.from_numpy(rows).long()
    return out


def _files_identity(path: str) -> list:
    """(name, size, mtime) of every file under a model directory: changes whenever the model is rewritten."""
    root = Path(path)
    return sorted([str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns]
                  for f in root.rglob('*') if f.is_file())


def _fp32_bytes(path: str) -> int:
    """The weights of a model directory once loaded in fp32: its weight files' bytes scaled by the stored dtype."""
    root = Path(path)
    stored = sum(f.stat().st_size for f in root.iterdir() if f.suffix in ('.safetensors', '.bin'))
    try:
        dtype = json.loads((root / 'config.json').read_text()).get('torch_dtype') or 'float32'
    except (OSError, ValueError):
        dtype = 'float32'
    return stored * 4 // {'float16': 2, 'bfloat16': 2}.get(str(dtype), 4)


def _resident_groups(labels: list, paths: dict, dense: str, budget: float) -> list:
    """Consecutive groups of ``labels`` whose fp32 weights fit ``budget`` bytes beside the dense model (which
    is always loaded; its own label costs nothing), at least one model per group."""
    groups, current, used = [], [], 0
    for label in labels:
        cost = 0 if label == dense else _fp32_bytes(paths[label])
        if current and used + cost > budget:
            groups.append(current)
            current, used = [], 0
        current.append(label)
        used += cost
    return groups + ([current] if current else [])


def evaluate_models(paths, dense, shards, heldout_sequences, icl, stage_dir, out_path, by_source=False,
                    lm_eval=None, resident_bytes=None):
    """The eval stage's work, in one process: writes ``out_path`` (JSON rows, one per model).

    Held-out scoring takes the models in groups whose fp32 weights fit ``resident_bytes`` beside the dense model
    (default: half the memory available when the stage starts): one dense forward per batch serves the whole
    group, and each model's logits are scored and dropped before the next model's (:func:`heldout_metrics`), so
    the peak is the group's weights plus two models' logits and the scoring's temporaries. Six fp32 SmolLM2
    models (0.5 GB each) make one group; Llama-2-7B ones (27 GB each) one model per group, never all at once.
    Each model's row is written to ``<stage_dir>/rows/<label>.json`` as soon as its held-out numbers exist (then
    again with ICL / lm-eval), with a key of its files, the dense model's, the data and the settings: a re-run
    after a crash scores only what has no row with the same key, and does not repeat held-out scoring for a
    model whose ICL was cut off.
    """
    import hashlib

    from transformers import AutoTokenizer

    from darwinlm_foundry.eval.heldout import heldout_metrics
    from darwinlm_foundry.eval.icl import LOCAL_TASKS, available_tasks, run_icl_eval
    from darwinlm_foundry.eval.lm_eval import run_lm_eval
    from darwinlm_foundry.data.shards import read_manifest
    from darwinlm_foundry.utils.checkpoints import load_hf_model

    token_sets = {'': _heldout_tokens(shards, heldout_sequences)}  # '': every domain together
    if by_source:
        token_sets.update(_heldout_by_source(shards, AutoTokenizer.from_pretrained(paths[dense]), heldout_sequences))
    settings = {'heldout_sequences': heldout_sequences, 'by_source': bool(by_source), 'icl': icl, 'lm_eval': lm_eval,
                'data': read_manifest(shards).get('fingerprint'), 'dense': _files_identity(paths[dense])}
    rows_dir = Path(stage_dir) / 'rows'
    keys, rows, complete = {}, {}, {}
    for label, path in paths.items():
        keys[label] = hashlib.sha256(json.dumps({'settings': settings, 'model': _files_identity(path)},
                                                sort_keys=True, default=str).encode()).hexdigest()
        row_file = rows_dir / f'{label}.json'
        if row_file.is_file():
            saved = json.loads(row_file.read_text())
            if saved.get('key') == keys[label]:
                rows[label], complete[label] = saved['row'], saved.get('complete', True)
                print(f'[darwinlm] eval {label}: ' + ('scored' if complete[label] else 'held-out scored')
                      + f' in an earlier run ({row_file})', flush=True)

    def save(label, done):
        atomic_write_json(rows_dir / f'{label}.json', {'key': keys[label], 'row': rows[label], 'complete': done},
                          indent=1)

    # held-out ppl / KL for every model without a row, in groups that share the dense forward passes
    pending = [label for label in paths if label not in rows]
    if pending:
        if resident_bytes is None:
            import psutil
            resident_bytes = psutil.virtual_memory().available / 2
        dense_model = load_hf_model(paths[dense]).float().eval()
        for group in _resident_groups(pending, paths, dense, resident_bytes):
            models = {label: dense_model if label == dense else load_hf_model(paths[label]).float().eval()
                      for label in group}
            models.setdefault(dense, dense_model)
            scores = {}
            for name, seqs in token_sets.items():
                t0 = time.time()
                scores[name] = heldout_metrics(models, dense, seqs, batch_size=8 if not name else 4)
                print(f'[darwinlm] eval held-out {name or "all domains"} ({len(seqs)} sequences): '
                      f'{", ".join(group)} in {time.time() - t0:.0f}s', flush=True)
            for label in group:
                rows[label] = {'method': label, 'params': count_parameters(models[label]), 'path': paths[label],
                               'heldout_ppl': scores[''][label]['ppl'], 'heldout_kl': scores[''][label]['kl']}
                if by_source:
                    rows[label]['heldout_by_source'] = {
                        name: {'ppl': s[label]['ppl'], 'kl': s[label]['kl'], 'tokens': int(token_sets[name].numel())}
                        for name, s in scores.items() if name}
                    print(f'[darwinlm] eval {label} held-out per domain: ' + ', '.join(
                        f'{name} {s[label]["ppl"]:.2f}' for name, s in scores.items() if name), flush=True)
                complete[label] = icl is None and lm_eval is None
                save(label, complete[label])
            del models, scores  # before the next group loads
        del dense_model  # before ICL / lm-eval load their own copies

    for label, path in paths.items():
        row = rows[label]
        if not complete[label]:
            if icl is not None:
                icl_args = dict(icl)
                data_dir = icl_args.pop('data_dir', None) or str(EMBEDDED_ICL)
                tasks = available_tasks(data_dir, LOCAL_TASKS)
                chosen = icl_args.pop('tasks', None)  # labels; default: every local task file found
                if chosen is not None:
                    unknown = sorted(set(chosen) - {t.label for t in tasks})
                    if unknown:
                        raise ValueError(f'eval: icl.tasks {unknown} not available; have {[t.label for t in tasks]}')
                    tasks = [t for t in tasks if t.label in chosen]
                tokenizer = AutoTokenizer.from_pretrained(path)
                result = run_icl_eval(path, tokenizer, data_dir, tasks,
                                      work_dir=os.path.join(stage_dir, f'icl_{label}'), **icl_args)
                row['tasks'] = result.tasks
                row['mean_accuracy'] = result.mean_accuracy  # the paper's 'avg'
                row['gauntlet_average'] = result.gauntlet_average
            if lm_eval is not None:
                args = dict(lm_eval)
                row['lm_eval'] = run_lm_eval(path, data_dir=args.pop('data_dir', None) or str(EMBEDDED_ICL),
                                             work_dir=os.path.join(stage_dir, f'lm_eval_{label}'), **args)
                print(f'[darwinlm] eval {label} lm-eval: ' + ', '.join(
                    f'{task} {m.get("acc", float("nan")):.3f}' for task, m in row['lm_eval'].items()), flush=True)
            complete[label] = True
            save(label, True)
        print(f'[darwinlm] eval {label}: {row["params"]:,} params, held-out ppl {row["heldout_ppl"]:.2f}, '
              f'KL {row["heldout_kl"]:.4f}' + (f', ICL {row["tasks"]}' if 'tasks' in row else ''), flush=True)
    sources = {name: int(seqs.numel()) for name, seqs in token_sets.items() if name}
    atomic_write_json(out_path, {'dense': dense, 'rows': [rows[label] for label in paths],
                                 'heldout_sequences': heldout_sequences, 'heldout_sources': sources}, indent=1)


def run_export_stage(cfg, stage_dir, refs, run, outputs):
    """The final DarwinLM HF directory (model card) and the run report (Markdown + JSON + plots)."""
    from composer.utils import dist

    from darwinlm_foundry.eval.export import export_pruned
    from darwinlm_foundry.eval.report import layers_from_config, write_report
    from darwinlm_foundry.stages.common import base_model
    from darwinlm_foundry.utils.checkpoints import load_hf_model

    model_dir = refs['model']['model']
    out_model = os.path.join(stage_dir, 'model')
    report_dir = os.path.join(stage_dir, 'report')
    if dist.get_global_rank() == 0:
        model = load_hf_model(model_dir)
        searches = [json.loads(Path(outputs[name]['levels']).read_text()) for name in cfg.searches]
        # one fitness curve per search stage (probe fitness where the search recorded it), labelled by stage
        curves = {name: search for name, search in zip(cfg.searches, searches)}
        # the original dense model (recorded by the model / pretrain stage), never the pruned input itself
        export_pruned(model, out_model, tokenizer=model_dir, base_model=str(base_model(refs)), overwrite=True,
                      data_note=f'shards: {refs["data"]["shards"]}' if 'data' in refs else 'see run manifest',
                      levels=getattr(model.config, 'levels', None))
        eval_rows, sizes = [], {}
        if 'eval' in refs:
            evaluation = json.loads(Path(refs['eval']['report']).read_text())
            for row in evaluation['rows']:
                sizes[row['method']] = row['params']
                tasks = dict(row.get('tasks') or {})
                tasks.update({f'lm_eval:{task}': m['acc'] for task, m in (row.get('lm_eval') or {}).items()
                              if 'acc' in m})
                tasks.update(heldout_ppl=row['heldout_ppl'], heldout_kl=row['heldout_kl'])
                # avg: mean ICL accuracy, as in the paper (nan without ICL tasks; never the perplexity)
                eval_rows.append({'method': row['method'], 'params': row['params'], 'tasks': tasks,
                                  'avg': row.get('mean_accuracy', float('nan'))})
        sizes.setdefault('exported', count_parameters(model))
        write_report(report_dir, sizes=sizes, levels=layers_from_config(model.config), fitness_curves=curves,
                     eval_table=eval_rows, title=f'DarwinLM run report: {os.path.basename(run.run_dir)}',
                     extra={'searches': [{'stage': name, **{k: s.get(k) for k in (
                         'levels', 'fitness', 'probe_fitness', 'parameters', 'dense_parameters', 'generations')}}
                                         for name, s in zip(cfg.searches, searches)]})
        print(f'[darwinlm] pruned model: {os.path.abspath(out_model)}\n'
              f'[darwinlm] report: {os.path.abspath(os.path.join(report_dir, "report.md"))}', flush=True)
    dist.barrier()
    return {'model': os.path.abspath(out_model), 'report': os.path.abspath(os.path.join(report_dir, 'report.md'))}
