"""The `search` run stage: evolutionary search over a database, then the winner as a shrunk HF checkpoint."""

import os


def run_search_stage(cfg, stage_dir, refs, run, outputs):
    """Search (or resume the search) and stitch the winner; gradual mode when ``start`` names a search."""
    from composer.utils import dist
    from transformers import AutoTokenizer

    from darwinlm_foundry.obs.database import SparsityDatabase, dense_tensor_getter
    from darwinlm_foundry.search.engine import EvolutionarySearch
    from darwinlm_foundry.search.settings import SearchSettings
    from darwinlm_foundry.search.tokens import ShardTokens
    from darwinlm_foundry.stages.common import base_model
    from darwinlm_foundry.utils.checkpoints import save_hf_model

    settings = dict(cfg.search)
    settings['output_dir'] = os.path.join(stage_dir, 'search')
    settings.setdefault('seed', run.seed)
    if cfg.start is not None:
        # Gradual pruning: the earlier search's winner is the starting point; `extra_levels` more are spread.
        settings['start_config'] = refs['start']['levels']
        settings['target_level'] = None
    model_dir = refs['model']['model']
    db = SparsityDatabase.open(refs['database']['database'], model_dir, verify='size')
    getter = dense_tensor_getter(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    search = EvolutionarySearch(SearchSettings.from_dict(settings), db, getter,
                                ShardTokens(os.path.join(refs['data']['shards'], 'search')), tokenizer=tokenizer,
                                log_fn=_console_log)
    result = search.run()
    out = os.path.join(stage_dir, 'model')
    if dist.get_global_rank() == 0:
        winner = db.stitch(result.winner.to_dict(), getter)
        save_hf_model(winner, tokenizer, out)
        print(f'[darwinlm] search winner: {result.parameters:,} parameters (dense {result.dense_parameters:,}), '
              f'{_describe_fitness(result)}; levels {result.winner.to_dict()}', flush=True)
    dist.barrier()
    return {'levels': os.path.abspath(result.json_path), 'model': os.path.abspath(out),
            'database': refs['database']['database'], 'base_model': base_model(refs)}


def _console_log(metrics, step):
    # every generation: one line a minute or so on a real model is what tells a user the search moves
    print('[darwinlm] search ' + ' '.join(f'{k.split("/")[-1]}={v:.4g}' if isinstance(v, float) else
                                          f'{k.split("/")[-1]}={v}' for k, v in metrics.items()), flush=True)


def _describe_fitness(result) -> str:
    """The winner's fitness for the console: last-step and probe fitness (0 generations: the start's probe)."""
    if not result.history:
        probe = 'n/a' if result.probe_fitness is None else f'{result.probe_fitness:.4g}'
        return f'0 generations (the start configuration), probe fitness {probe}'
    text = f'fitness {result.fitness:.4g}'
    if result.probe_fitness is not None:
        text += f', probe fitness {result.probe_fitness:.4g}'
    if result.winner.to_dict() != result.history[-1]['winner']:  # not the last parent (winner rule)
        text += (f'; the parent after generation {result.winner_generation} of {len(result.history)} '
                 f'(winner: {result.winner_rule})')
    return text
