"""lm-evaluation-harness on an exported pruned model.

* :func:`run_lm_eval` — lm-evaluation-harness (``HFLM``, ``trust_remote_code=True``) on an exported HF
  directory: the paper's lm-eval tasks and shots when their datasets are reachable (cached; never downloaded
  here), or task YAMLs written by :func:`write_lm_eval_tasks` over the local JSONL files.

lm-eval is imported inside the functions that need it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

log = logging.getLogger(__name__)

__all__ = ['LmEvalTask', 'PAPER_LM_EVAL_TASKS', 'LOCAL_LM_EVAL_TASKS', 'write_lm_eval_tasks', 'run_lm_eval',
           'DatasetUnreachableError']


# ============================================================================ lm-evaluation-harness
@dataclass(frozen=True)
class LmEvalTask:
    """A local lm-eval task over a foundry-format JSONL file: its templates and shots."""

    name: str               # lm-eval task name (``local_<label>``)
    label: str              # foundry file stem
    num_fewshot: int
    doc_to_text: str
    doc_to_choice: str
    doc_to_target: str
    metrics: tuple = ('acc', 'acc_norm')


# The paper's lm-eval tasks and shots (run only where their datasets are reachable).
PAPER_LM_EVAL_TASKS: dict[str, int] = {'arc_easy': 0, 'logiqa': 0, 'piqa': 0, 'sciq': 0, 'boolq': 0, 'mmlu': 5,
                                       'winogrande': 5, 'hellaswag': 10, 'arc_challenge': 25}
# foundry rows -> lm-eval templates. Multiple choice: query + "Answer:", choices, gold index. Winogrande is
# lm-eval's "multiple inputs" form: the choices are the two contexts, the target the shared continuation and
# doc_to_text the gold context index.
_MC = dict(doc_to_text='{{query.strip()}}\nAnswer:', doc_to_choice='{{choices}}', doc_to_target='gold')
LOCAL_LM_EVAL_TASKS: tuple[LmEvalTask, ...] = (
    LmEvalTask('local_arc_easy', 'arc_easy', 0, **_MC),
    LmEvalTask('local_arc_challenge', 'arc_challenge', 25, **_MC),
    LmEvalTask('local_piqa', 'piqa', 0, **_MC),
    LmEvalTask('local_boolq', 'boolq', 0, **_MC, metrics=('acc',)),
    LmEvalTask('local_logi_qa', 'logi_qa', 0, **_MC),
    LmEvalTask('local_winogrande', 'winogrande', 5, doc_to_text='gold', doc_to_choice='{{context_options}}',
               doc_to_target='{{continuation}}', metrics=('acc',)),
)


class DatasetUnreachableError(RuntimeError):
    """An lm-eval task's dataset is neither cached nor local (the harness may not download it here)."""


def _yaml_quote(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid YAML double-quoted scalar


def write_lm_eval_tasks(data_dir, out_dir, tasks: Sequence[LmEvalTask] = LOCAL_LM_EVAL_TASKS) -> list[str]:
    """Write one lm-eval task YAML per task whose JSONL exists in ``data_dir`` (``dataset_path: json``, the
    file as its test split, few-shot examples drawn from the same split); returns the task names written."""
    data_dir, out_dir = Path(data_dir).resolve(), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for task in tasks:
        path = data_dir / f'{task.label}.jsonl'
        if not path.is_file():
            log.warning('lm-eval task %s skipped: %s not found', task.name, path)
            continue
        metric_lines = ''.join(f'  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n'
                               for m in task.metrics)
        (out_dir / f'{task.name}.yaml').write_text(
            f'task: {task.name}\n'
            'dataset_path: json\n'
            f'dataset_kwargs:\n  data_files:\n    test: {_yaml_quote(str(path))}\n'
            'test_split: test\n'
            'fewshot_split: test\n'
            'output_type: multiple_choice\n'
            f'num_fewshot: {task.num_fewshot}\n'
            f'doc_to_text: {_yaml_quote(task.doc_to_text)}\n'
            f'doc_to_choice: {_yaml_quote(task.doc_to_choice)}\n'
            f'doc_to_target: {_yaml_quote(task.doc_to_target)}\n'
            f'metric_list:\n{metric_lines}'
            'metadata:\n  version: 1.0\n', encoding='utf-8')
        names.append(task.name)
    if not names:
        raise FileNotFoundError(f'no local lm-eval task file found in {data_dir}')
    return names


@contextmanager
def _offline():
    """Forbid the HF hub and datasets from touching the network inside the block."""
    keys = ('HF_DATASETS_OFFLINE', 'HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE')
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: '1' for k in keys})
    try:
        import datasets.config
        import huggingface_hub.constants
        saved = (datasets.config.HF_DATASETS_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)
        datasets.config.HF_DATASETS_OFFLINE = True  # read at import time: patch the live flags too
        huggingface_hub.constants.HF_HUB_OFFLINE = True
        try:
            yield
        finally:
            datasets.config.HF_DATASETS_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _check_reachable(task_manager, names: Sequence[str]) -> None:
    """Build each task (loads its dataset, offline); raise DatasetUnreachableError naming those that fail."""
    from lm_eval.tasks import get_task_dict
    failed = {}
    for name in names:
        try:
            get_task_dict([name], task_manager)
        except Exception as err:  # datasets raises several types for "not cached and offline"
            failed[name] = f'{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ""}'
    if failed:
        detail = '; '.join(f'{k} ({v})' for k, v in failed.items())
        raise DatasetUnreachableError(
            f'lm-eval datasets unreachable offline: {detail}. Pre-download them into the HF datasets cache on a '
            f'machine with network access (HF_DATASETS_CACHE), or evaluate on local files with '
            f'run_lm_eval(..., data_dir=<dir of foundry JSONL task files>).')


def run_lm_eval(model_dir, *, data_dir=None, tasks: Optional[Sequence[str]] = None, limit: Optional[int] = None,
                batch_size: int = 8, device: str = 'cpu', dtype: str = 'float32',
                work_dir=None) -> dict[str, dict[str, float]]:
    """lm-evaluation-harness on an exported HF directory (loaded with ``trust_remote_code=True``).

    Without ``data_dir``: the paper's tasks (:data:`PAPER_LM_EVAL_TASKS`, or the names in ``tasks``) at their
    shot counts; their datasets must be reachable offline, else :class:`DatasetUnreachableError` says which
    and what to do. With ``data_dir``: the local task YAMLs written by :func:`write_lm_eval_tasks` over its
    JSONL files (``tasks`` selects by lm-eval name, e.g. ``['local_arc_easy']``). ``limit``: documents per
    task. The network is never used. Returns ``{task: {metric: value}}`` (lm-eval's metric names without the
    ``,none`` filter suffix).
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    own_dir = work_dir is None
    work_dir = Path(work_dir or tempfile.mkdtemp(prefix='darwinlm_lmeval_'))
    results = {}
    try:
        with _offline():
            if data_dir is not None:
                names = write_lm_eval_tasks(data_dir, work_dir / 'tasks')
                if tasks is not None:
                    missing = set(tasks) - set(names)
                    if missing:
                        raise ValueError(f'local lm-eval tasks {sorted(missing)} not available; have {names}')
                    names = list(tasks)
                manager = TaskManager(include_path=str(work_dir / 'tasks'), include_defaults=False)
                groups = {None: names}  # shots come from each task YAML
            else:
                names = list(tasks) if tasks is not None else list(PAPER_LM_EVAL_TASKS)
                manager = TaskManager()
                unknown = [n for n in names if n not in manager.all_tasks]
                if unknown:
                    raise ValueError(f'unknown lm-eval tasks {unknown}')
                _check_reachable(manager, names)
                groups = {}
                for n in names:
                    groups.setdefault(PAPER_LM_EVAL_TASKS.get(n, 0), []).append(n)
            lm = HFLM(pretrained=str(model_dir), tokenizer=str(model_dir), trust_remote_code=True,
                      device=device, dtype=dtype, batch_size=batch_size)
            for shots, group in groups.items():
                out = simple_evaluate(model=lm, tasks=group, num_fewshot=shots, limit=limit,
                                      task_manager=manager, log_samples=False, bootstrap_iters=0,
                                      verbosity='WARNING')
                for task, metrics in out['results'].items():
                    results[task] = {k.split(',')[0]: float(v) for k, v in metrics.items()
                                     if ',' in k and isinstance(v, (int, float)) and 'stderr' not in k}
    finally:
        if own_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    return results
