"""Chained run stages: one YAML, stages that name each other's outputs, resumable, launcher-aware.

A run YAML::

    run_dir: runs/darwinlm_tiny
    stages:
      - {name: data, kind: data, source: embedded, seq_len: 128}
      - {name: dense, kind: pretrain, data: data}
      - {name: db5, kind: database, model: dense, data: data, calibration: {num_sequences: 64}}
      - {name: search5, kind: search, model: dense, database: db5, data: data, search: {target_level: 5}}
      - {name: train5, kind: train, model: search5, data: data, train: {<llm-foundry train config>}}
      ...

A stage refers to an earlier stage by name through the key of the output it needs (``model``,
``database``, ``data``, ``start``); paths are never copied by hand. ``run_dir/stages.json`` records each
finished stage with the fingerprint of its resolved inputs: re-running skips finished stages whose inputs are
unchanged, re-runs any whose inputs changed (and so everything downstream), and resumes an interrupted stage
(database builds, searches and Composer training all resume from their own checkpoints).

Under ``composer -n N`` every rank runs the same chain: database calibration, search and training use all
ranks; single-writer steps (conversion, export, the manifest) run on rank 0 behind barriers.
"""

import dataclasses
import hashlib
import json
import os
import sys
import time
import warnings
from typing import Any, Callable, Dict, List, Optional

from darwinlm_foundry.stages.schema import REFERENCE_KEYS, DataStage, parse_run
from darwinlm_foundry.utils.io import atomic_write_json
from darwinlm_foundry.utils.memory import peak_rss_gb, release_memory, reset_peak_rss, rss_gb

MANIFEST = 'stages.json'


# --------------------------------------------------------------------------------------------------
# Manifest and fingerprints
# --------------------------------------------------------------------------------------------------
def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RunManifest:
    """``run_dir/stages.json``: per finished stage, its input fingerprint and outputs (atomic writes)."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, MANIFEST)
        self.stages: Dict[str, Any] = {}
        if os.path.exists(self.path):
            try:
                with open(self.path) as f:
                    self.stages = json.load(f)['stages']
            except (json.JSONDecodeError, KeyError) as err:
                raise RuntimeError(f'{self.path} is corrupt ({err}); delete it to re-run every stage '
                                   '(finished work inside the stage folders is reused where it can be).') from err

    def finished(self, name: str, fingerprint: str) -> Optional[dict]:
        rec = self.stages.get(name)
        return rec['outputs'] if rec and rec['fingerprint'] == fingerprint else None

    def record(self, name: str, fingerprint: str, outputs: dict, seconds: float, peak_rss_gb: Optional[float] = None,
               rss_after_gb: Optional[float] = None):
        self.stages[name] = {'fingerprint': fingerprint, 'outputs': outputs, 'seconds': round(seconds, 1),
                             'finished_at': f'{time.time():.6f}'}
        if peak_rss_gb is not None:  # rank 0's process during the stage (jobs it ran in a subprocess excluded)
            self.stages[name]['peak_rss_gb'] = round(peak_rss_gb, 2)
        if rss_after_gb is not None:  # what the process still holds after the stage (and release_memory)
            self.stages[name]['rss_after_gb'] = round(rss_after_gb, 2)
        atomic_write_json(self.path, {'stages': self.stages}, indent=1)


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------
def _dist():
    from composer.utils import dist
    return dist


def run_chain(cfg: Dict[str, Any], log: Callable[[str], None] = print) -> Dict:
    """Run (or resume) every stage of a run config; returns each stage's outputs."""
    from darwinlm_foundry.stages import runners as stage_runners
    from darwinlm_foundry.stages.preflight import preflight
    run, stages = parse_run(cfg)
    preflight(run, stages)  # before any compute: missing inputs, unsupported models, impossible levels
    dist = _dist()
    if dist.get_world_size() > 1 and not dist.is_initialized():
        dist.initialize_dist('cuda' if _cuda() else 'cpu', timeout=run.dist_timeout)
    os.makedirs(run.run_dir, exist_ok=True)
    manifest = RunManifest(run.run_dir)
    outputs: Dict[str, dict] = {}
    # A stage's version is its input fingerprint plus when it finished: a stage whose upstream re-ran has a
    # new fingerprint, so it re-runs too, also when the upstream re-ran in an earlier, interrupted invocation.
    versions: Dict[str, str] = {}
    rank0 = dist.get_global_rank() == 0
    for stage in stages:
        config = dataclasses.asdict(stage.config)
        refs = _references(stage.config, versions)
        upstream = {key: versions[ref] for key, ref in refs.items()}
        fingerprint = _fingerprint({'kind': stage.kind, 'config': config, 'upstream': upstream, 'seed': run.seed})
        done = manifest.finished(stage.name, fingerprint)
        if done is not None and _outputs_exist(done):
            outputs[stage.name] = done
            versions[stage.name] = f'{fingerprint}@{manifest.stages[stage.name]["finished_at"]}'
            if rank0:
                log(f'[darwinlm] stage {stage.name} ({stage.kind}): finished earlier, skipped')
            continue
        if rank0:
            log(f'[darwinlm] stage {stage.name} ({stage.kind}): running')
        start = time.time()
        peak_is_per_stage = reset_peak_rss()
        stage_dir = os.path.join(run.run_dir, stage.name)
        os.makedirs(stage_dir, exist_ok=True)
        resolved = {key: outputs[ref] for key, ref in refs.items()}
        result = stage_runners.RUNNERS[stage.kind](stage.config, stage_dir, resolved, run, outputs)
        dist.barrier()
        outputs[stage.name] = result
        # one process runs every stage: what a stage freed (cycles such as a Composer Trainer, fragmented heap)
        # goes back before the next one starts; rss_after_gb is what stays
        release_memory()
        record = [None]
        if rank0:
            peak, after = peak_rss_gb(), rss_gb()
            manifest.record(stage.name, fingerprint, result, time.time() - start, peak if peak_is_per_stage else None,
                            after or None)
            record[0] = manifest.stages[stage.name]
            log(f'[darwinlm] stage {stage.name} ({stage.kind}): done in {time.time() - start:.0f}s, peak RSS '
                f'{peak:.2f} GB{"" if peak_is_per_stage else " (since the process began)"}, {after:.2f} GB after '
                f'-> {json.dumps(result)}')
        dist.broadcast_object_list(record, src=0)
        manifest.stages[stage.name] = record[0]
        versions[stage.name] = f'{fingerprint}@{record[0]["finished_at"]}'
    return outputs


def _references(config, earlier=()) -> Dict[str, str]:
    refs = {key: getattr(config, key) for key in REFERENCE_KEYS if isinstance(getattr(config, key, None), str)}
    if isinstance(config, DataStage) and config.tokenizer in earlier:  # the tokenizer of an earlier model stage
        refs['tokenizer'] = config.tokenizer
    for label, ref in (getattr(config, 'models', None) or {}).items():
        refs[f'models.{label}'] = ref
    for i, ref in enumerate(getattr(config, 'searches', None) or []):
        refs[f'searches.{i}'] = ref
    if isinstance(getattr(config, 'dense', None), str):
        refs['dense'] = config.dense
    return refs


def _outputs_exist(outputs: dict) -> bool:
    return all(os.path.exists(v) for k, v in outputs.items()
               if k != 'base_model' and isinstance(v, str) and v.startswith(('/', '.')))


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def load_run_yaml(path: str, overrides: Optional[List[str]] = None) -> Dict[str, Any]:
    """Read a run YAML with OmegaConf (``${...}`` interpolation, dotlist overrides) into a plain dict."""
    from omegaconf import OmegaConf
    # ${darwinlm_asset:icl/piqa.jsonl}: a file shipped inside the package (the embedded demo's data).
    if not OmegaConf.has_resolver('darwinlm_asset'):
        assets = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'assets')
        with warnings.catch_warnings():  # omegaconf 2.4 renames the call; 2.3 has only this one
            warnings.simplefilter('ignore')
            OmegaConf.register_new_resolver('darwinlm_asset', lambda sub: os.path.join(assets, sub))
    if not os.path.exists(path):
        raise FileNotFoundError(f'run config {path} does not exist')
    cfg = OmegaConf.load(path)
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    return OmegaConf.to_container(cfg, resolve=True)


def main(argv: Optional[List[str]] = None) -> Dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ('-h', '--help'):
        print('usage: composer train.py <run.yaml> [key=value ...] [--validate]\n'
              '       --validate: check the whole chain (keys, types, references, inputs) and stop\n'
              '       (a plain llm-foundry train YAML, without `stages:`, runs foundry\'s train loop as is)')
        return {}
    validate = '--validate' in argv
    argv = [a for a in argv if a != '--validate']
    path, overrides = argv[0], argv[1:]
    cfg = load_run_yaml(path, overrides)
    if validate:  # keys, types, references and the inputs that exist already; no weights or data loaded
        if 'stages' not in cfg:
            raise SystemExit(f'{path}: --validate checks DarwinLM chains (a YAML with `stages:`)')
        from darwinlm_foundry.stages.preflight import preflight
        try:
            run, stages = parse_run(cfg)
            checked = preflight(run, stages)
        except (ValueError, OSError) as err:
            raise SystemExit(f'[darwinlm] {path} is not valid: {err}') from None
        for line in checked:
            print(f'[darwinlm] ok {line}')
        print(f'[darwinlm] {path}: {len(stages)} stages valid ({", ".join(s.name for s in stages)})')
        return {}
    if 'stages' not in cfg:
        from darwinlm_foundry.stages.train import foundry_train
        from darwinlm_foundry.utils.composer import close_trainer
        close_trainer(foundry_train(cfg))  # closes callbacks and loggers now (foundry's train() leaves it open)
        return {}
    return run_chain(cfg)
