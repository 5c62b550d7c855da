"""Run the DarwinLM search under ``composer -n 2`` (CPU, gloo); used by tests/search/test_engine.py.

Usage: ``composer -n 2 tests/search/_search_dist.py <work_dir>``. ``<work_dir>`` holds ``dense/`` (HF checkpoint),
``db/`` (its sparsity database), ``tokens.pt`` and ``settings.json``; each rank writes ``rank<r>.json``
with its final configuration, fitness history and the distributed mode it used.
"""

import json
import os
import sys

import torch


def main(work: str) -> None:
    torch.set_num_threads(1)
    from composer.utils import dist

    dist.initialize_dist('cpu')

    from darwinlm_foundry.obs.database import SparsityDatabase, dense_tensor_getter
    from darwinlm_foundry.search.engine import EvolutionarySearch
    from darwinlm_foundry.search.settings import SearchSettings

    with open(os.path.join(work, 'settings.json'), encoding='utf-8') as f:
        settings = SearchSettings.from_dict(json.load(f))
    getter = dense_tensor_getter(os.path.join(work, 'dense'))
    db = SparsityDatabase.open(os.path.join(work, 'db'), getter, verify='size')
    evaluated = []
    engine = EvolutionarySearch(settings, db, getter, torch.load(os.path.join(work, 'tokens.pt')),
                                candidate_hook=lambda config, model: evaluated.append(config.to_dict()))
    result = engine.run()
    rank = dist.get_global_rank()
    with open(os.path.join(work, f'rank{rank}.json'), 'w', encoding='utf-8') as f:
        json.dump({'levels': result.winner.to_dict(), 'fitness_history': result.fitness_history(),
                   'mode': engine.mode, 'world_size': engine.world_size, 'evaluated_here': len(evaluated),
                   'fits_here': engine.stats['fits']}, f)
    dist.barrier()


if __name__ == '__main__':
    main(sys.argv[1])
