"""Composer algorithm: OBS structured pruning to a level assignment, applied at ``Event.INIT``.

Registered in llm-foundry's ``algorithms`` registry as ``darwinlm_prune``::

    algorithms:
      darwinlm_prune:
        database: ${run_dir}/database           # built here if absent (needs `calibration`)
        levels: 5                               # uniform level, or a searched configuration file
        calibration: {shards: ${data}/mds, split: calibration, num_sequences: 2048, seq_len: 4096}
"""

from dataclasses import dataclass
from typing import Optional, Union

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from composer.utils import dist

from darwinlm_foundry.obs.calibration import CalibrationConfig  # noqa: F401 (re-exported)
from darwinlm_foundry.utils.config import from_mapping
from darwinlm_foundry.utils.params import count_parameters


def calibration_batches(cfg: CalibrationConfig, rank: int = 0, world_size: int = 1):
    """This rank's share of the calibration sequences, as batches of token ids."""
    from darwinlm_foundry.data.loaders import sample_sequences
    tokens = sample_sequences(f'{cfg.shards.rstrip("/")}/{cfg.split}', cfg.num_sequences, cfg.seq_len, seed=cfg.seed)
    mine = tokens[rank::world_size]
    return [mine[i:i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]


def build_or_open_database(hf_model, db_dir: str, calibration: Optional[CalibrationConfig], model_name=None):
    """Open the database of ``hf_model`` in ``db_dir``, building (or resuming) it first when incomplete."""
    from darwinlm_foundry.obs.database import SparsityDatabase, build_database, is_complete, torch_distributed_hooks
    from darwinlm_foundry.structure.levels import LevelSpec

    if is_complete(db_dir):
        return SparsityDatabase.open(db_dir, hf_model)
    if calibration is None:
        raise ValueError(f'no complete sparsity database in {db_dir}: give a `calibration` section (shards, split, '
                         'num_sequences, seq_len) so it can be built, or point `database` at a built one.')
    world, rank = dist.get_world_size(), dist.get_global_rank()
    hooks = dict(zip(('reduce_fn', 'gather_fn', 'rank', 'world_size'), torch_distributed_hooks())) if world > 1 else {}
    device = calibration.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    spec = LevelSpec.from_config(hf_model.config, mlp_multiple=calibration.mlp_multiple,
                                 num_levels=calibration.num_levels)
    build_database(hf_model, calibration_batches(calibration, rank, world), db_dir, level_spec=spec,
                   dampening=calibration.dampening, device=device,
                   calibration_source=f'{calibration.shards}/{calibration.split}', model_name=model_name, **hooks)
    dist.barrier()
    return SparsityDatabase.open(db_dir, hf_model, verify='size')


def load_levels(levels: Union[int, str, dict], num_layers: int):
    """A uniform level, a ``{'attn': [...], 'mlp': [...]}`` dict, or a searched configuration file (JSON/text)."""
    from darwinlm_foundry.search.space import LevelConfig, uniform
    if isinstance(levels, int):
        return uniform(num_layers, levels)
    if isinstance(levels, dict):
        return LevelConfig.from_dict(levels)
    return LevelConfig.read_file(str(levels))


@dataclass
class PruneConfig:
    database: str
    levels: Union[int, str, dict] = 5
    calibration: Optional[dict] = None
    model_name: Optional[str] = None


class DarwinLMPrune(Algorithm):
    """Prune the trained model to a level assignment with the OBS sparsity database, at ``Event.INIT``.

    Runs once, before DDP/FSDP wrapping and before the first optimizer step. It builds (or resumes, or loads)
    the sparsity-level database of the model being trained, stitches the shrunk DarwinLM model for the level
    assignment (uniform level or a searched configuration) from the database and the model's own dense
    weights, and swaps it into the Composer model; optimizer parameter groups follow by parameter name.

    Args:
        database: database directory.
        levels: uniform level (int), ``{'attn': [...], 'mlp': [...]}``, or a configuration file written by
            the search callback (JSON) or in the research code's ``layer: level`` text format.
        calibration: :class:`CalibrationConfig` keys; required only when the database must be built.
        model_name: recorded in the database manifest.
    """

    def __init__(self, database: str, levels: Union[int, str, dict] = 5, calibration: Optional[dict] = None,
                 model_name: Optional[str] = None):
        self.config = from_mapping(PruneConfig, dict(database=database, levels=levels, calibration=calibration,
                                                     model_name=model_name), 'darwinlm_prune')
        self.calibration = (from_mapping(CalibrationConfig, calibration, 'darwinlm_prune.calibration')
                            if calibration is not None else None)
        self.applied = False

    def match(self, event: Event, state: State) -> bool:
        return event == Event.INIT and not self.applied

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        from darwinlm_foundry.obs.database import dense_tensor_getter
        from darwinlm_foundry.structure.surgery import swap_hf_model

        hf_model = state.model.model
        db = build_or_open_database(hf_model, self.config.database, self.calibration, self.config.model_name)
        levels = load_levels(self.config.levels, hf_model.config.num_hidden_layers)
        shrunk = db.stitch(levels.to_dict(), dense_tensor_getter(hf_model), config=hf_model.config)
        swap_hf_model(state.model, shrunk, state.optimizers)
        self.applied = True
        n_params = count_parameters(shrunk)
        logger.log_hyperparameters({'darwinlm/levels': levels.to_dict(), 'darwinlm/params': n_params})
