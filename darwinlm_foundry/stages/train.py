"""The `train` run stage: post-training with llm-foundry's own train loop, exported as a Hugging Face directory."""

import copy
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

from darwinlm_foundry.stages.common import base_model
from darwinlm_foundry.utils.checkpoints import load_hf_model, save_hf_model
from darwinlm_foundry.utils.composer import close_trainer
from darwinlm_foundry.utils.dist import barrier, rank


def foundry_train(cfg: Dict[str, Any]):
    """llm-foundry's own train loop on a plain foundry config (our registry entries are visible to it); returns
    its trainer, which the caller closes."""
    from llmfoundry.command_utils import train
    from omegaconf import OmegaConf

    from darwinlm_foundry.data.loaders import serialized_shm_registration
    from darwinlm_foundry.utils.composer import weak_engine_atexit

    # the lock: two jobs on one node would otherwise race for streaming's shared-memory prefix; the weak at-exit
    # close: once the caller closes and drops the trainer, its model and optimizer are freed (the chain goes on)
    with serialized_shm_registration(), weak_engine_atexit():
        return train(OmegaConf.create(cfg))


def run_train(cfg, stage_dir, refs, run, outputs):
    """Post-train with foundry's train(): FSDP / loggers / autoresume as the YAML says; exports a HF directory."""
    from darwinlm_foundry.data.loaders import text_dataloader_cfg
    model_dir, shards = refs['model']['model'], refs['data']['shards']
    train_cfg = copy.deepcopy(cfg.train)
    model = train_cfg.setdefault('model', {})
    model.setdefault('name', 'darwinlm')
    model.setdefault('pretrained', True)
    model['pretrained_model_name_or_path'] = model_dir
    train_cfg.setdefault('tokenizer', {'name': model_dir, 'kwargs': {'model_max_length': train_cfg['max_seq_len']}})
    # foundry's text loader over the data stage's train split; the YAML's train_loader keys override it.
    loader = text_dataloader_cfg(shards, 'train', train_cfg['max_seq_len'], shuffle_seed=run.seed,
                                 cache_dir=os.path.join(stage_dir, 'mds_cache'))
    user_loader = train_cfg.get('train_loader') or {}
    loader['dataset'].update(user_loader.get('dataset', {}))
    loader.update({k: v for k, v in user_loader.items() if k != 'dataset'})
    train_cfg['train_loader'] = loader
    train_cfg.setdefault('run_name', os.path.basename(stage_dir))
    train_cfg.setdefault('save_folder', os.path.join(stage_dir, 'checkpoints'))
    train_cfg.setdefault('autoresume', True)
    train_cfg.setdefault('seed', run.seed)
    export_dir = os.path.join(stage_dir, 'export')
    callbacks = train_cfg.setdefault('callbacks', {}) or {}
    train_cfg['callbacks'] = callbacks
    callbacks.setdefault('hf_checkpointer', {'save_folder': export_dir, 'save_interval': train_cfg['max_duration'],
                                             'precision': 'float32'})
    final = os.path.join(stage_dir, 'model')
    finished = _final_checkpoint(train_cfg['save_folder'], train_cfg['max_duration'])
    if finished is not None:
        # Killed after the last Composer checkpoint but before the export: training is complete, and
        # foundry would refuse to resume a finished run, so export the checkpoint's weights directly.
        if rank() == 0:
            _export_checkpoint(finished, model_dir, final)
        barrier()
        return {'model': os.path.abspath(final), 'base_model': base_model(refs)}
    trainer = _train_with_icl_files_in(train_cfg, os.path.join(stage_dir, 'icl_tasks'))
    batch = int(trainer.state.timestamp.batch)
    close_trainer(trainer)  # its model and optimizer are freed with it: the chain goes on in this process
    del trainer
    exported = os.path.join(export_dir, 'huggingface', f'ba{batch}')
    if rank() == 0:
        if not os.path.exists(os.path.join(exported, 'config.json')):
            raise RuntimeError(f'train stage: foundry exported no Hugging Face checkpoint at {exported}')
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(exported, f'{final}.tmp', dirs_exist_ok=True)
        _add_remote_code(f'{final}.tmp')
        os.replace(f'{final}.tmp', final)
    barrier()
    return {'model': os.path.abspath(final), 'base_model': base_model(refs)}


def _train_with_icl_files_in(train_cfg: Dict[str, Any], icl_dir: str):
    """foundry's train(), with the copies of the ICL task files it makes kept in ``icl_dir``: foundry's train
    loop has no setting for where, and would write ``<label>-<shots>.jsonl`` into the current directory."""
    import functools
    from unittest import mock

    from llmfoundry.utils import builders
    os.makedirs(icl_dir, exist_ok=True)
    evaluators = functools.partial(builders.build_icl_evaluators, destination_dir=os.path.abspath(icl_dir))
    with mock.patch.object(builders, 'build_icl_evaluators', evaluators):
        return foundry_train(train_cfg)


def _final_checkpoint(save_folder: str, max_duration) -> Optional[str]:
    """The Composer checkpoint file written at ``max_duration`` (in batches), if training got there."""
    match = re.fullmatch(r'(\d+)ba', str(max_duration))
    if not match or not os.path.isdir(save_folder):
        return None
    for name in os.listdir(save_folder):
        if re.fullmatch(rf'ep\d+-ba{match.group(1)}-rank0\.pt', name):
            return os.path.join(save_folder, name)
    return None


def _add_remote_code(model_dir: str) -> None:
    """Copy the DarwinLM modelling files its ``auto_map`` names into ``model_dir`` where they are missing.

    foundry's HF checkpointer writes the config's ``auto_map`` but not always the code it points at, and stock
    transformers (lm-eval's HFLM, a user's ``trust_remote_code``) then cannot load the directory."""
    config = json.loads(Path(model_dir, 'config.json').read_text())
    source = Path(__file__).parent.parent / 'modeling'
    for ref in (config.get('auto_map') or {}).values():
        name = f'{ref.split(".")[0]}.py'
        if (source / name).exists() and not Path(model_dir, name).exists():
            shutil.copy2(source / name, Path(model_dir, name))


def _export_checkpoint(checkpoint: str, model_dir: str, out_dir: str):
    import torch
    # this run's own Composer checkpoint (written by the train stage; it holds RNG / optimizer objects that
    # weights_only=True refuses), never a file from outside the run
    state = torch.load(checkpoint, map_location='cpu', weights_only=False)['state']['model']
    model = load_hf_model(model_dir)
    weights = {k[len('model.'):]: v for k, v in state.items() if k.startswith('model.')}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {'lm_head.weight'} if model.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(f'{checkpoint} does not match the model in {model_dir}: missing {missing[:5]}, '
                           f'unexpected {unexpected[:5]}')
    save_hf_model(model.float(), model_dir, out_dir)
