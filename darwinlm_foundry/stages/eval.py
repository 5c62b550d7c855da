"""The `eval` and `export` run stages: held-out perplexity / KL side by side, foundry ICL tasks, export, report."""

import json
import os
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


def evaluate_models(paths, dense, shards, heldout_sequences, icl, stage_dir, out_path, by_source=False,
                    lm_eval=None):
    """The eval stage's work, in one process: writes ``out_path`` (JSON rows, one per model).

    One model at a time beside the dense one (two in memory, whatever the number of models: six fp32 SmolLM2
    models held 12.4 GB at once, six Llama-2-7B ones would need 160 GB); the dense logits of each held-out
    batch are recomputed per model, the price of that bound. Each finished model's row is written at once to
    ``<stage_dir>/rows/<label>.json`` with a key of its files, the dense model's, the data and the settings:
    a re-run after a crash scores only the models that have no row with the same key.
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
    dense_model = None
    rows = []
    for label, path in paths.items():
        key = hashlib.sha256(json.dumps({'settings': settings, 'model': _files_identity(path)}, sort_keys=True,
                                        default=str).encode()).hexdigest()
        row_file = rows_dir / f'{label}.json'
        if row_file.is_file():
            saved = json.loads(row_file.read_text())
            if saved.get('key') == key:
                rows.append(saved['row'])
                print(f'[darwinlm] eval {label}: scored in an earlier run ({row_file})', flush=True)
                continue
        if dense_model is None:
            dense_model = load_hf_model(paths[dense]).float().eval()
        model = dense_model if label == dense else load_hf_model(path).float().eval()
        pair = {dense: dense_model, label: model}
        scores = {name: heldout_metrics(pair, dense, seqs, batch_size=8 if not name else 4)[label]
                  for name, seqs in token_sets.items()}
        row = {'method': label, 'params': count_parameters(model), 'path': path,
               'heldout_ppl': scores['']['ppl'], 'heldout_kl': scores['']['kl']}
        del model, pair  # before ICL / lm-eval load their own copy
        if by_source:
            row['heldout_by_source'] = {name: {'ppl': s['ppl'], 'kl': s['kl'], 'tokens': int(token_sets[name].numel())}
                                        for name, s in scores.items() if name}
            print(f'[darwinlm] eval {label} held-out per domain: ' + ', '.join(
                f'{name} {s["ppl"]:.2f}' for name, s in scores.items() if name), flush=True)
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
        atomic_write_json(row_file, {'key': key, 'row': row}, indent=1)
        rows.append(row)
        print(f'[darwinlm] eval {label}: {row["params"]:,} params, held-out ppl {row["heldout_ppl"]:.2f}, '
              f'KL {row["heldout_kl"]:.4f}' + (f', ICL {row["tasks"]}' if 'tasks' in row else ''), flush=True)
    sources = {name: int(seqs.numel()) for name, seqs in token_sets.items() if name}
    atomic_write_json(out_path, {'dense': dense, 'rows': rows, 'heldout_sequences': heldout_sequences,
                                 'heldout_sources': sources}, indent=1)


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
