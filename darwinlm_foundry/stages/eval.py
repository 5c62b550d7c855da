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


def evaluate_models(paths, dense, shards, heldout_sequences, icl, stage_dir, out_path, by_source=False,
                    lm_eval=None):
    """The eval stage's work, in one process: writes ``out_path`` (JSON rows, one per model)."""
    from transformers import AutoTokenizer

    from darwinlm_foundry.eval.heldout import heldout_metrics
    from darwinlm_foundry.eval.icl import LOCAL_TASKS, available_tasks, run_icl_eval
    from darwinlm_foundry.eval.lm_eval import run_lm_eval
    from darwinlm_foundry.utils.checkpoints import load_hf_model

    models = {label: load_hf_model(path).float().eval() for label, path in paths.items()}
    tokens = _heldout_tokens(shards, heldout_sequences)
    heldout = heldout_metrics(models, dense, tokens)
    domains = {}
    if by_source:
        for name, seqs in _heldout_by_source(shards, AutoTokenizer.from_pretrained(paths[dense]),
                                             heldout_sequences).items():
            domains[name] = {'tokens': int(seqs.numel()), **heldout_metrics(models, dense, seqs, batch_size=4)}
            print(f'[darwinlm] eval held-out {name} ({seqs.numel():,} tokens): ' + ', '.join(
                f'{label} {domains[name][label]["ppl"]:.2f}' for label in models), flush=True)
    rows = []
    for label, model in models.items():
        row = {'method': label, 'params': count_parameters(model), 'path': paths[label],
               'heldout_ppl': heldout[label]['ppl'], 'heldout_kl': heldout[label]['kl']}
        if domains:
            row['heldout_by_source'] = {name: {'ppl': d[label]['ppl'], 'kl': d[label]['kl'], 'tokens': d['tokens']}
                                        for name, d in domains.items()}
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
            tokenizer = AutoTokenizer.from_pretrained(paths[label])
            result = run_icl_eval(paths[label], tokenizer, data_dir, tasks,
                                  work_dir=os.path.join(stage_dir, f'icl_{label}'), **icl_args)
            row['tasks'] = result.tasks
            row['mean_accuracy'] = result.mean_accuracy  # the paper's 'avg'
            row['gauntlet_average'] = result.gauntlet_average
        if lm_eval is not None:
            args = dict(lm_eval)
            row['lm_eval'] = run_lm_eval(paths[label], data_dir=args.pop('data_dir', None) or str(EMBEDDED_ICL),
                                         work_dir=os.path.join(stage_dir, f'lm_eval_{label}'), **args)
            print(f'[darwinlm] eval {label} lm-eval: ' + ', '.join(
                f'{task} {m.get("acc", float("nan")):.3f}' for task, m in row['lm_eval'].items()), flush=True)
        rows.append(row)
        print(f'[darwinlm] eval {label}: {row["params"]:,} params, held-out ppl {row["heldout_ppl"]:.2f}, '
              f'KL {row["heldout_kl"]:.4f}' + (f', ICL {row["tasks"]}' if 'tasks' in row else ''), flush=True)
    atomic_write_json(out_path, {'dense': dense, 'rows': rows, 'heldout_sequences': heldout_sequences,
                                 'heldout_sources': {name: d['tokens'] for name, d in domains.items()}}, indent=1)


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
