"""OBS structured pruning to a level assignment: :func:`apply_darwinlm_prune` on any model (a bare Hugging Face
model too), and the thin Composer algorithm :class:`DarwinLMPrune` that runs it at ``Event.INIT``.

Registered in llm-foundry's ``algorithms`` registry as ``darwinlm_prune``::

    algorithms:
      darwinlm_prune:
        database: ${run_dir}/database           # built here if absent (needs `calibration`)
        levels: 5                               # uniform level, or a searched configuration file
        calibration: {shards: ${data}/mds, split: calibration, num_sequences: 2048, seq_len: 4096}
"""

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from composer.utils import dist

from darwinlm_foundry.obs.calibration import CalibrationConfig
from darwinlm_foundry.utils.config import from_mapping
from darwinlm_foundry.utils.params import count_parameters

__all__ = ['apply_darwinlm_prune', 'DarwinLMPrune', 'CalibrationConfig', 'build_or_open_database', 'load_levels']


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
                                 num_levels=calibration.num_levels,
                                 mlp_split=calibration.mlp_level_split if calibration.mlp_level_split > 1 else None)
    build_database(hf_model, calibration_batches(calibration, rank, world), db_dir, level_spec=spec,
                   dampening=calibration.dampening, device=device,
                   calibration_source=f'{calibration.shards}/{calibration.split}', model_name=model_name, **hooks)
    dist.barrier()
    return SparsityDatabase.open(db_dir, hf_model, verify='size')


def load_levels(levels, num_layers: int, mlp_split: int = 1):
    """A uniform level (int; the MLP at ``level * mlp_split`` with finer MLP levels), a ``{'attn': [...], 'mlp':
    [...]}`` dict, a ``LevelConfig``, or a level file (``winner.json`` or ``layer: level`` text, read by
    :meth:`LevelConfig.read_file`)."""
    from darwinlm_foundry.search.space import LevelConfig, uniform
    if isinstance(levels, LevelConfig):
        return levels
    if isinstance(levels, int):
        return uniform(num_layers, levels, mlp_split=mlp_split)
    if isinstance(levels, dict):
        return LevelConfig.from_dict(levels)
    return LevelConfig.read_file(str(levels))


def apply_darwinlm_prune(model: torch.nn.Module, database, levels=5,
                         calibration: Optional[Union[dict, CalibrationConfig]] = None, model_name: Optional[str] = None,
                         optimizers: Optional[Union[torch.optim.Optimizer, Sequence[torch.optim.Optimizer]]] = None
                         ) -> torch.nn.Module:
    """Prune ``model`` to a level assignment with the OBS sparsity database; returns the shrunk model.

    The shrunk model is a ``DarwinLMForCausalLM`` whose matrices are physically smaller, stitched from the
    database's kept structures and compensated weights and ``model``'s own dense tensors. It is another class
    than a dense Llama / Mistral / Qwen2 model, so it cannot be made in place:

    * a bare Hugging Face model is left as it is and the shrunk one is returned;
    * a Composer model wrapping one in ``.model`` (``HuggingFaceModel``, foundry's ``hf_causal_lm`` /
      ``darwinlm``) gets the shrunk model swapped in, and ``optimizers`` that hold its parameters are pointed
      at the new ones by parameter name (they must not have stepped yet).

    Args:
        model: the dense (or already pruned DarwinLM) model: bare Hugging Face, or a Composer model.
        database: the database directory, or an opened
            :class:`~darwinlm_foundry.obs.database.SparsityDatabase`. A directory without a complete
            database is built (or resumed) first, from ``calibration``.
        levels: a uniform level (int), ``{'attn': [...], 'mlp': [...]}``, a ``LevelConfig``, or a level file
            written by the search (``winner.json``) or in the research code's ``layer: level`` text format.
        calibration: :class:`~darwinlm_foundry.obs.calibration.CalibrationConfig` (or its keys); needed only
            when the database must be built.
        model_name: recorded in the manifest of a database built here.
        optimizers: existing optimizers bound to ``model``'s parameters (Composer model only).

    Example::

        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained('/ckpt/Llama-2-7b-hf')
        pruned = apply_darwinlm_prune(model, 'runs/db', levels='runs/search5/search/winner.json')
        pruned.save_pretrained('llama-2-level5')
    """
    from transformers import PreTrainedModel

    from darwinlm_foundry.obs.database import SparsityDatabase, dense_tensor_getter
    from darwinlm_foundry.structure.surgery import swap_hf_model

    bare = isinstance(model, PreTrainedModel)  # a causal LM holds its decoder in `.model` too: test it first
    hf_model = model if bare else model.model
    if isinstance(calibration, dict):
        calibration = from_mapping(CalibrationConfig, calibration, 'darwinlm_prune.calibration')
    db = (database if isinstance(database, SparsityDatabase)
          else build_or_open_database(hf_model, str(database), calibration, model_name))
    config = load_levels(levels, hf_model.config.num_hidden_layers, db.level_spec.mlp_split)
    shrunk = db.stitch(config.to_dict(), dense_tensor_getter(hf_model), config=hf_model.config)
    if bare:
        ref = next(hf_model.parameters())
        return shrunk.to(device=ref.device, dtype=ref.dtype).train(hf_model.training)
    if isinstance(optimizers, torch.optim.Optimizer):
        optimizers = [optimizers]
    swap_hf_model(model, shrunk, optimizers)
    return shrunk


@dataclass
class PruneConfig:
    database: str
    levels: Union[int, str, dict] = 5
    calibration: Optional[dict] = None
    model_name: Optional[str] = None


class DarwinLMPrune(Algorithm):
    """Prune the model being trained to a level assignment with the OBS sparsity database
    (:func:`apply_darwinlm_prune`).

    Runs on :attr:`.Event.INIT`, once: the shrunk model is another module with smaller matrices, so it must be
    swapped in before the model is DDP / FSDP wrapped and before the optimizer's first step (its parameter
    groups are rebuilt by name; surgery after a step is refused). Builds (or resumes, or opens) the database
    of the model being trained, stitches the shrunk DarwinLM model for the level assignment from it and the
    model's own dense weights, and logs the levels and the parameter count as hyperparameters
    (``darwinlm/levels``, ``darwinlm/params``).

    Registered in llm-foundry's ``algorithms`` registry as ``darwinlm_prune`` (YAML keys as the arguments).

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
        del event  # INIT only (match)
        shrunk = apply_darwinlm_prune(state.model, self.config.database, self.config.levels, self.calibration,
                                      self.config.model_name, state.optimizers)
        self.applied = True
        logger.log_hyperparameters({'darwinlm/levels': shrunk.config.levels,
                                    'darwinlm/params': count_parameters(shrunk)})
