"""Composer callback ``darwinlm_search``: run the DarwinLM evolutionary search at the start of a fit.

From a foundry YAML::

    callbacks:
      darwinlm_search:
        database: ${variables.run_dir}/database      # built by the OBS pass (build_database)
        data: ${variables.data_local}/search          # MDS split the search samples from
        apply: true                                   # post-train the winner in this same fit
        search_only: false                            # true: stop right after the search
        target_level: 5
        generations: 200
        # ... any other SearchSettings field (offspring, survivors, fitness_tokens, train_tokens, lr, ...)
"""

from __future__ import annotations

import json
import logging
import os
import random
from typing import Any, Optional, Union

import numpy as np
import torch
from composer.core import Callback, State
from composer.loggers import Logger

from darwinlm_foundry.search.engine import EvolutionarySearch, SearchResult
from darwinlm_foundry.search.settings import SearchSettings
from darwinlm_foundry.search.space import LevelConfig
from darwinlm_foundry.search.tokens import ShardTokens, TokenSource
from darwinlm_foundry.utils.params import count_parameters

__all__ = ['DarwinLMSearch']

log = logging.getLogger(__name__)


class DarwinLMSearch(Callback):
    """Searches per-unit sparsity levels at ``Event.INIT`` and hands the winner on.

    **When it runs:** once, at ``Event.INIT`` of the Trainer, i.e. after the model and optimizer are built and
    before DDP/FSDP wrapping, checkpoint loading and the first batch. The search (see
    :class:`~darwinlm_foundry.search.engine.EvolutionarySearch`) resumes from ``<output_dir>/search_state.json``
    when it exists with matching settings; a finished search is just reloaded. Every rank runs it together
    (offspring spread over ranks, or FSDP-sharded fits, as ``distributed`` says).

    **What it changes:** it writes ``winner.json`` / ``winner.txt`` (and the search state) to ``output_dir``.
    With ``apply=True`` it replaces the trained HF module by the winner, stitched from the database as a
    physically shrunk ``DarwinLMForCausalLM`` (:func:`darwinlm_foundry.structure.surgery.swap_hf_model`, optimizer
    param groups re-pointed by name), so the rest of the fit post-trains the winner. With
    ``search_only=True`` it stops training at ``Event.FIT_START`` (nothing is trained). Global RNG states are
    restored after the search, so the post-training run sees the same randomness as without it.

    **What it logs:** every generation, through the Trainer's :class:`~composer.loggers.Logger` (so to every
    logger destination: console, MLflow, W&B, ...), with ``step`` = the number of completed generations.
    Step 0 is the start configuration (logged when a search starts from scratch, also with
    ``generations: 0``). The keys:

    +-------------------------------------+-----------------------------------------------------------+
    | Key                                 | Logged data                                               |
    +=====================================+===========================================================+
    | `search/generation`                 | Generations completed (0: the start configuration)        |
    +-------------------------------------+-----------------------------------------------------------+
    |                                     | KL to the dense model (or perplexity, per ``fitness``) of |
    | `search/fitness`                    | the generation's winner in the last selection step, on    |
    |                                     | that generation's fresh sample (not logged at step 0).    |
    |                                     | Jumps with the sample: compare `search/probe_fitness`     |
    +-------------------------------------+-----------------------------------------------------------+
    |                                     | The parent (the generation's winner; at step 0 the start) |
    | `search/probe_fitness`              | as stitched, scored on the fixed probe sample (the same   |
    |                                     | ``probe_tokens`` tokens every generation): comparable     |
    |                                     | across generations. Only logged with ``probe_tokens`` > 0 |
    +-------------------------------------+-----------------------------------------------------------+
    | `search/params`                     | Parameters of the parent (constant: mutations keep size)  |
    +-------------------------------------+-----------------------------------------------------------+
    |                                     | With ``balance_kinds``, at step 0 only: the exchanges of  |
    | `search/kind_balance_shift`         | attention for MLP levels of the chosen start (> 0: more   |
    |                                     | attention pruned than uniform, < 0: less)                 |
    +-------------------------------------+-----------------------------------------------------------+
    |                                     | With ``protect_units``, at step 0 only: how many units    |
    | `search/protected_units`            | the start protected (one per round that beat the start)   |
    +-------------------------------------+-----------------------------------------------------------+
    |                                     | Wall seconds of the generation divided by the candidates  |
    | `search/sec_per_offspring`          | it evaluated (offspring of every step plus the parent;    |
    |                                     | not logged at step 0)                                     |
    +-------------------------------------+-----------------------------------------------------------+
    | `search/parent_kept`                | 1 when the parent beat every offspring, else 0 (not at 0) |
    +-------------------------------------+-----------------------------------------------------------+
    | `search/level/attn_<LL>`,           | Level of the parent's attention / MLP unit in layer LL    |
    | `search/level/mlp_<LL>`             | (two digits), every generation including step 0           |
    +-------------------------------------+-----------------------------------------------------------+
    | `search/levels` (table)             | The same levels as a table ``layer, attn_level,           |
    |                                     | mlp_level`` (destinations without tables ignore it)       |
    +-------------------------------------+-----------------------------------------------------------+

    Hyperparameters, logged once: `search/mode` and `search/world_size` before the search; after it
    `search/winner_levels` (JSON), `search/winner_params`, `search/dense_params`, `search/winner_fitness`
    (last-step fitness of the winner; when the winner is the start, its probe fitness, or None),
    `search/winner_probe_fitness` (None without a probe), `search/winner_generation` (the winner is the parent
    after this generation, 0: the start; ``winner`` setting) and `search/winner_json` (path of ``winner.json``).

    Args:
        database (str): directory of the sparsity database of the model being trained (or of ``dense``).
        data (str | TokenSource): a local MDS split to draw fine-tuning / fitness samples from (e.g.
            ``<shards>/search``), or a :class:`~darwinlm_foundry.search.tokens.TokenSource` when built in Python.
        apply (bool, optional): swap the winner into the trained model. Default: ``True``.
        search_only (bool, optional): stop the fit right after the search. Default: ``False``.
        dense (str, optional): checkpoint directory of the database's source model. Default: ``None`` (the
            model being trained).
        **search: :class:`~darwinlm_foundry.search.settings.SearchSettings` fields (unknown names are rejected).

    Example:
        .. code-block:: python

            from composer import Trainer
            from darwinlm_foundry.callbacks.evolutionary_search import DarwinLMSearch

            search = DarwinLMSearch(database='runs/db', data='runs/mds/search', search_only=True,
                                    target_level=5, generations=200, output_dir='runs/search5')
            trainer = Trainer(model=model, callbacks=[search], loggers=[...])  # searches at INIT
            winner = search.result.winner  # also in runs/search5/winner.json
    """

    def __init__(self, database: str, data: Union[str, TokenSource], apply: bool = True, search_only: bool = False,
                 dense: Optional[str] = None, **search: Any):
        self.database = os.fspath(database)
        self.data = data if isinstance(data, TokenSource) else os.fspath(data)
        self.apply = bool(apply)
        self.search_only = bool(search_only)
        self.dense = None if dense is None else os.fspath(dense)
        self.settings = SearchSettings.from_dict(search)
        self.result: Optional[SearchResult] = None

    # -- events ------------------------------------------------------------------------------------
    def init(self, state: State, logger: Logger) -> None:
        from darwinlm_foundry.obs.database import SparsityDatabase, dense_tensor_getter

        composer_model = state.model
        hf_model = getattr(composer_model, 'model', None)
        if not isinstance(hf_model, torch.nn.Module):
            raise TypeError('darwinlm_search needs a Hugging Face causal LM wrapped by Composer (model.name: '
                            'darwinlm or hf_causal_lm)')
        getter = dense_tensor_getter(self.dense if self.dense is not None else hf_model)
        if getter.config is None:
            getter.config = hf_model.config
        db = SparsityDatabase.open(self.database, getter, verify='size')
        rng = _rng_states()
        try:
            data = self.data if isinstance(self.data, TokenSource) else ShardTokens(self.data)
            engine = EvolutionarySearch(self.settings, db, getter, data,
                                        tokenizer=getattr(composer_model, 'tokenizer', None),
                                        log_fn=lambda metrics, step: logger.log_metrics(metrics, step=step),
                                        levels_fn=lambda config, g: _log_levels(logger, config, g))
            logger.log_hyperparameters({'search/mode': engine.mode, 'search/world_size': engine.world_size})
            self.result = engine.run()
        finally:
            _restore_rng_states(rng)
        result = self.result
        logger.log_hyperparameters({
            'search/winner_levels': json.dumps(result.winner.to_dict()),
            'search/winner_params': result.parameters,
            'search/dense_params': result.dense_parameters,
            'search/winner_fitness': result.fitness,
            'search/winner_probe_fitness': result.probe_fitness,
            'search/winner_generation': result.winner_generation,
            'search/winner_json': result.json_path,
        })
        log.info('darwinlm_search: winner %s (%d of %d parameters), written to %s', result.winner.to_dict(),
                 result.parameters, result.dense_parameters, result.json_path)
        if self.apply:
            from darwinlm_foundry.structure.surgery import swap_hf_model
            winner = db.stitch(result.winner, getter)
            del getter, engine  # the getter holds the dense tensors
            swap_hf_model(composer_model, winner, state.optimizers)
            log.info('darwinlm_search: the trained model is now the winner (%d parameters)',
                     count_parameters(winner))

    def fit_start(self, state: State, logger: Logger) -> None:
        if self.search_only:
            log.info('darwinlm_search: search_only is set, stopping before the first batch')
            state.stop_training()


def _log_levels(logger: Logger, config: LevelConfig, generation: int) -> None:
    """The parent's levels per layer as a table (destinations without tables ignore it) and as metrics."""
    rows = [[layer, a, m] for layer, (a, m) in enumerate(zip(config.attn, config.mlp))]
    logger.log_table(columns=['layer', 'attn_level', 'mlp_level'], rows=rows, name='search/levels', step=generation)
    metrics = {f'search/level/{kind}_{layer:02d}': level for kind, layer, level in config.items()}
    logger.log_metrics(metrics, step=generation)


def _rng_states() -> dict:
    states = {'torch': torch.get_rng_state(), 'numpy': np.random.get_state(), 'python': random.getstate()}
    if torch.cuda.is_available():
        states['cuda'] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states['torch'])
    np.random.set_state(states['numpy'])
    random.setstate(states['python'])
    if 'cuda' in states:
        torch.cuda.set_rng_state_all(states['cuda'])
