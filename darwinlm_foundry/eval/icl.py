"""In-context-learning evaluation of pruned models: llm-foundry's ICL evaluators and gauntlet.

* :func:`run_icl_eval` — llm-foundry's ICL evaluators (``build_icl_evaluators``), its ``EvalGauntlet``
  aggregation and Composer's ``Trainer.eval`` on a Composer model (the ``darwinlm`` foundry model over a
  pruned checkpoint). foundry pads every sequence to ``max_seq_len``; the fast path (the default) feeds the
  same tokens to the same foundry metric without that padding, each question's shared prefix run once (see
  :func:`score_icl_batch`). The task list is :data:`PAPER_TASKS` (the paper's tasks and shots) by default,
  read from a data directory of foundry-format JSONL files (``<label>.jsonl``); tasks whose file is missing
  are skipped with a logged note. :func:`icl_tasks_config` / :func:`eval_gauntlet_config` give the same config
  as plain dicts, e.g. for the ``icl_tasks:`` / ``eval_gauntlet:`` sections of a training YAML (in-training
  ICL eval); ``yamls/eval_gauntlet_local.yaml`` is that fragment for the local task files.

lm-evaluation-harness is :mod:`darwinlm_foundry.eval.lm_eval`; held-out perplexity / KL is
:mod:`darwinlm_foundry.eval.heldout`. Composer and llm-foundry are imported inside the functions that
need them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

log = logging.getLogger(__name__)

__all__ = [
    'IclTask', 'PAPER_TASKS', 'LOCAL_TASKS', 'GAUNTLET_CATEGORIES', 'available_tasks', 'icl_tasks_config',
    'eval_gauntlet_config', 'icl_yaml_fragment', 'build_icl_eval', 'run_icl_eval', 'IclEvalResult',
    'score_icl_batch', 'load_darwinlm_composer_model',
]


# ============================================================================ foundry ICL tasks
@dataclass(frozen=True)
class IclTask:
    """One llm-foundry ICL benchmark: its file ``<label>.jsonl`` in the data directory and how to score it.

    ``icl_task_type`` follows the file's rows: ``multiple_choice`` (``query`` / ``choices`` / ``gold``),
    ``schema`` (``context_options`` / ``continuation`` / ``gold``), ``language_modeling`` (``context`` /
    ``continuation``). ``continuation_delimiter`` as in foundry's ``tasks_v0.3.yaml`` (None: foundry's
    default, a space). ``random_baseline`` is chance accuracy (the gauntlet subtracts it).
    """

    label: str
    num_fewshot: int
    icl_task_type: str
    category: str
    random_baseline: float
    continuation_delimiter: Optional[str] = None

    @property
    def file_name(self) -> str:
        return f'{self.label}.jsonl'

    @property
    def key(self) -> str:
        """Result key, as foundry labels the evaluator: ``<label>/<n>-shot``."""
        return f'{self.label}/{self.num_fewshot}-shot'


_ANSWER = '\nAnswer: '
# The paper's task list and shots (0-shot ARC-E, LogiQA, PIQA, SciQ, BoolQ; 5-shot MMLU, WinoGrande; 10-shot
# HellaSwag; 25-shot ARC-C), with foundry's file names, task types and delimiters.
PAPER_TASKS: tuple[IclTask, ...] = (
    IclTask('arc_easy', 0, 'multiple_choice', 'world_knowledge', 0.25, _ANSWER),
    IclTask('logi_qa', 0, 'multiple_choice', 'symbolic_problem_solving', 0.25, _ANSWER),
    IclTask('piqa', 0, 'multiple_choice', 'commonsense_reasoning', 0.5, _ANSWER),
    IclTask('sciq', 0, 'multiple_choice', 'world_knowledge', 0.25, _ANSWER),
    IclTask('boolq', 0, 'multiple_choice', 'reading_comprehension', 0.5, _ANSWER),
    IclTask('mmlu', 5, 'multiple_choice', 'world_knowledge', 0.25, _ANSWER),
    IclTask('winogrande', 5, 'schema', 'language_understanding', 0.5),
    IclTask('hellaswag', 10, 'multiple_choice', 'language_understanding', 0.25),
    IclTask('arc_challenge', 25, 'multiple_choice', 'world_knowledge', 0.25, _ANSWER),
)
# Every task file shipped in the shared local ICL directory (paper tasks that exist there, plus three more).
LOCAL_TASKS: tuple[IclTask, ...] = tuple(t for t in PAPER_TASKS if t.label not in ('sciq', 'mmlu', 'hellaswag')) + (
    IclTask('copa', 0, 'multiple_choice', 'commonsense_reasoning', 0.5),
    IclTask('openbook_qa', 0, 'multiple_choice', 'commonsense_reasoning', 0.25),
    IclTask('lambada_openai_small', 0, 'language_modeling', 'language_understanding', 0.0),
)
GAUNTLET_CATEGORIES = ('world_knowledge', 'commonsense_reasoning', 'language_understanding',
                       'symbolic_problem_solving', 'reading_comprehension')


def available_tasks(data_dir, tasks: Sequence[IclTask] = PAPER_TASKS) -> list[IclTask]:
    """The tasks of ``tasks`` whose file exists in ``data_dir``; each missing one is logged and skipped."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f'ICL data directory {data_dir} does not exist; point data_dir at a directory of '
                                'foundry-format task files (<label>.jsonl).')
    found = []
    for task in tasks:
        if (data_dir / task.file_name).is_file():
            found.append(task)
        else:
            log.warning('ICL task %s skipped: %s not found in %s', task.key, task.file_name, data_dir)
    if not found:
        raise FileNotFoundError(f'none of the ICL task files {[t.file_name for t in tasks]} is in {data_dir}.')
    return found


def _task_entry(task: IclTask, dataset_uri: str, **extra) -> dict:
    entry = {'label': task.label, 'dataset_uri': dataset_uri, 'num_fewshot': [task.num_fewshot],
             'icl_task_type': task.icl_task_type}
    if task.continuation_delimiter is not None:
        entry['continuation_delimiter'] = task.continuation_delimiter
    entry.update(extra)
    return entry


def icl_tasks_config(data_dir, tasks: Sequence[IclTask] = PAPER_TASKS) -> list[dict]:
    """foundry ``icl_tasks`` entries for the tasks whose file exists in ``data_dir`` (missing ones skipped)."""
    return [_task_entry(t, str(Path(data_dir) / t.file_name)) for t in available_tasks(data_dir, tasks)]


def eval_gauntlet_config(tasks: Sequence[IclTask]) -> dict:
    """foundry ``eval_gauntlet`` section over ``tasks``: one category per task group, equal weights, accuracy
    above chance rescaled to [0, 1] (foundry's defaults), and ``core_average`` over the categories present."""
    categories = []
    for name in GAUNTLET_CATEGORIES:
        bench = [{'name': t.label, 'num_fewshot': t.num_fewshot, 'random_baseline': t.random_baseline}
                 for t in tasks if t.category == name]
        if bench:
            categories.append({'name': name, 'benchmarks': bench})
    unknown = {t.category for t in tasks} - set(GAUNTLET_CATEGORIES)
    if unknown:
        raise ValueError(f'unknown gauntlet categories {sorted(unknown)}; use one of {GAUNTLET_CATEGORIES}.')
    return {'weighting': 'EQUAL', 'subtract_random_baseline': True, 'rescale_accuracy': True,
            'averages': {'core_average': [c['name'] for c in categories]}, 'categories': categories}


def icl_yaml_fragment(tasks: Sequence[IclTask] = LOCAL_TASKS, data_dir_variable: str = 'icl_data_dir',
                      default_data_dir: str = '../shared/data/icl') -> dict:
    """The ``variables`` / ``icl_tasks`` / ``eval_gauntlet`` YAML fragment, data directory as a variable.

    ``dataset_uri`` entries read ``${variables.<data_dir_variable>}/<label>.jsonl`` (foundry resolves the
    ``variables:`` section), so one override moves every task. ``yamls/eval_gauntlet_local.yaml`` is this.
    """
    ref = '${variables.' + data_dir_variable + '}'
    return {'variables': {data_dir_variable: default_data_dir},
            'icl_tasks': [_task_entry(t, f'{ref}/{t.file_name}') for t in tasks],
            'eval_gauntlet': eval_gauntlet_config(tasks)}


def _num_choices(path: Path, task_type: str) -> int:
    """Choices per example of a task file (1 for language modelling)."""
    if task_type == 'language_modeling':
        return 1
    with open(path, encoding='utf-8') as f:
        row = json.loads(f.readline())
    return len(row['context_options'] if task_type == 'schema' else row['choices'])


def _stage_limited(task: IclTask, data_dir: Path, stage_dir: Path, limit: int) -> Path:
    """Copy the first ``limit + num_fewshot`` rows of a task file: ``limit`` evaluated examples and a few-shot
    pool as large as the shots asked for (foundry draws shots from the same file)."""
    src, dst = data_dir / task.file_name, stage_dir / task.file_name
    keep = limit + task.num_fewshot
    with open(src, encoding='utf-8') as fin, open(dst, 'w', encoding='utf-8') as fout:
        for i, line in enumerate(fin):
            if i >= keep:
                break
            fout.write(line)
    return dst


def _largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, max(1, min(n, cap)) + 1) if n % d == 0)


def build_icl_eval(tokenizer, data_dir, tasks: Sequence[IclTask] = PAPER_TASKS, *, limit: Optional[int] = None,
                   device_eval_batch_size: int = 4, max_seq_len: int = 2048, work_dir=None, fast: bool = True):
    """foundry ICL evaluators and the gauntlet callback for ``tasks`` found in ``data_dir``.

    Returns ``(evaluators, logger_keys, eval_gauntlet_callback, tasks_used)``. ``limit`` evaluates only the
    first ``limit`` examples of each task (smoke tests): the task file is staged in ``work_dir`` with
    ``limit + num_fewshot`` rows, the per-task batch size is chosen to divide ``limit`` exactly and the
    evaluator stops after ``limit`` examples. ``device_eval_batch_size`` counts sequences, as in foundry
    (a multiple-choice example takes one per choice). ``work_dir`` receives foundry's copies of the task files
    (a new temporary directory when None, left for the caller to remove).

    ``fast`` (default): the evaluators' batches hold examples of similar length and are cut after their
    longest sequence (:func:`_unpadded`); same examples, tokens and metric, so the same accuracies as
    ``fast=False``, foundry's dataloaders as built (every sequence padded to ``max_seq_len``).
    """
    from llmfoundry.callbacks import EvalGauntlet
    from llmfoundry.utils.builders import build_icl_evaluators

    if limit is not None and limit < 1:
        raise ValueError(f'limit must be a positive number of examples per task, got {limit}')
    data_dir = Path(data_dir)
    used = available_tasks(data_dir, tasks)
    work_dir = Path(work_dir or tempfile.mkdtemp(prefix='darwinlm_icl_'))
    work_dir.mkdir(parents=True, exist_ok=True)
    entries, per_example = [], {}
    for task in used:
        n_choices = _num_choices(data_dir / task.file_name, task.icl_task_type)
        if limit is None:
            entries.append(_task_entry(task, str(data_dir / task.file_name)))
            continue
        uri = _stage_limited(task, data_dir, work_dir, limit)
        examples_per_batch = _largest_divisor_at_most(limit, max(1, device_eval_batch_size // n_choices))
        per_example[task.key] = examples_per_batch
        entries.append(_task_entry(task, str(uri), batch_size=examples_per_batch * n_choices))
    # What foundry's build_icl_data_and_gauntlet does, with the task-file copies kept in work_dir (it would
    # put them in the current directory).
    evaluators, logger_keys = build_icl_evaluators(entries, tokenizer, max_seq_len, device_eval_batch_size,
                                                   destination_dir=str(work_dir))
    gauntlet = EvalGauntlet(**eval_gauntlet_config(used), logger_keys=logger_keys,
                            benchmark_sizes={e.label: e.dataloader.num_samples for e in evaluators})
    if limit is not None:
        for ev in evaluators:
            ev.subset_num_batches = limit // per_example[ev.label]
    if fast:
        for ev in evaluators:
            _unpadded(ev, limit)
    return evaluators, logger_keys, gauntlet, used


# ---------------------------------------------------------------------------- fast ICL scoring
# foundry's ICL datasets right-pad every sequence to max_seq_len (multiple choice, schema and LM tasks), so a
# 0-shot question of 30 tokens costs 512 positions, and the model computes vocabulary logits at every one of
# them although the metric (InContextLearningMultipleChoiceAccuracy / LMAccuracy) reads only the positions
# that predict the continuation tokens. The fast path keeps foundry's datasets (prompts, shots, trimming,
# tokens) and metrics and removes that waste in two exact steps:
# 1. data: examples in order of length, each batch cut after its longest sequence (_unpadded). With causal
#    attention, positions after a sequence's end never influence it, so the logits the metric reads are the
#    same function of the same tokens;
# 2. model (run_icl_eval): score_icl_batch runs each question's prefix shared by all its choices once (KV
#    cache), then only the choice tokens, and computes logits only where the metric reads them.
# Only floating-point rounding differs (other matrix shapes); tests/eval/test_evaluation.py and
# bench/eval_speed.py check that the accuracies are identical to the padded path.

def _content_end(continuation_indices) -> int:
    """One past the last real token of a dataset row (foundry puts the continuation last, then the padding);
    ``continuation_indices`` has one list per choice for multiple choice / schema rows."""
    rows = continuation_indices if isinstance(continuation_indices[0], (list, tuple)) else [continuation_indices]
    return max(int(c[-1]) for c in rows) + 1


def _cut_padding(batch: dict) -> dict:
    """A right-padded foundry ICL batch without the columns after its longest sequence. The end comes from
    ``continuation_indices``, not from the pad id: the pad token may also occur as a real token."""
    width = max(int(c[-1]) + 1 for c in batch['continuation_indices'])
    for key in ('input_ids', 'labels', 'attention_mask'):
        if isinstance(batch.get(key), torch.Tensor):
            batch[key] = batch[key][:, :width]
    return batch


def _unpadded(evaluator, limit: Optional[int]) -> None:
    """Re-batch a foundry ICL evaluator in place: its (first ``limit``) examples longest first, so that a
    batch holds examples of similar length, and each batch cut after its longest sequence. Same dataset,
    batch size, collate and split functions; Composer's own ``DataSpec`` hooks (``batch_transforms``)."""
    from composer.core import DataSpec
    from composer.utils import dist
    from torch.utils.data import DataLoader

    spec = evaluator.dataloader
    loader = spec.dataloader
    dataset = loader.dataset
    if getattr(dataset, 'padding_side', None) != 'right' or not len(dataset):
        return  # generation tasks are left-padded and scored on generated text: left as foundry builds them
    dataset[0]  # foundry tokenizes the whole file (prompts, shots) on first access
    if 'continuation_indices' not in dataset.dataset.column_names:
        return
    if dist.get_world_size() > 1:  # keep foundry's distributed sampler; only cut the padding
        spec.batch_transforms = _cut_padding
        return
    n = len(dataset) if limit is None else min(limit, len(dataset))
    ends = [_content_end(c) for c in dataset.dataset[:n]['continuation_indices']]
    order = sorted(range(n), key=lambda i: -ends[i])  # stable: ties keep the file order
    evaluator.dataloader = DataSpec(
        DataLoader(dataset, batch_size=loader.batch_size, sampler=order, collate_fn=loader.collate_fn),
        num_samples=n, batch_transforms=_cut_padding, split_batch=spec.split_batch,
        get_num_samples_in_batch=spec.get_num_samples_in_batch)


_LOGITS_TO_KEEP: dict = {}


def _accepts_logits_to_keep(lm) -> bool:
    import inspect
    key = type(lm)
    if key not in _LOGITS_TO_KEEP:
        _LOGITS_TO_KEEP[key] = 'logits_to_keep' in inspect.signature(lm.forward).parameters
    return _LOGITS_TO_KEEP[key]


def _shared_prefixes(ids, mask, groups, first) -> tuple[list, list]:
    """Split a batch's rows into groups that share a prefix: ``(rows per group, prefix length per group)``.

    A question's rows (``groups``: foundry's ``choice_groupings``) share the tokens and mask entries they all
    have before the first position any of them scores: a multiple-choice context, the common start of schema
    contexts. A question whose rows share nothing (contexts cut at different points by foundry's trimming
    to ``max_seq_len``: the cut depends on the answer's length) is split into the rows with identical
    contexts (answers of equal length), each set with its whole context as prefix.
    """
    out_groups, prefixes = [], []
    for start, end in groups:
        limit = min(first[start:end])
        rows_ids, rows_mask = ids[start:end, :limit], mask[start:end, :limit]
        same = ((rows_ids == rows_ids[0]) & (rows_mask == rows_mask[0])).all(0)
        differs = (~same).nonzero()
        shared = int(differs[0]) if len(differs) else limit
        if shared > 0 or end - start == 1:
            out_groups.append(list(range(start, end)))
            prefixes.append(shared)
            continue
        contexts: dict = {}
        for r in range(start, end):
            key = (tuple(ids[r, :first[r]].tolist()), tuple(mask[r, :first[r]].tolist()))
            contexts.setdefault(key, []).append(r)
        for rows in contexts.values():
            out_groups.append(rows)
            prefixes.append(first[rows[0]])
    return out_groups, prefixes


@torch.no_grad()
def score_icl_batch(lm, batch: dict) -> torch.Tensor:
    """The logits foundry's ICL metrics read, for a (right-padded) foundry ICL batch, from an HF causal LM.

    Returns a ``(batch, seq, vocab)`` tensor in which only the positions the metric indexes -- row ``r`` at
    ``continuation_indices[r] - 1`` -- are set (the rest is left uninitialised and never read). Two forward
    passes per batch: (1) each question's prefix shared by its choices (:func:`_shared_prefixes`; the
    context of an LM-task row) into a KV cache, once per question, and (2) every row from its prefix to its
    last scored position, on that cache, with vocabulary logits only at scored positions. Attention masks
    and positions are those of the full sequences (padding columns masked, positions given explicitly), so
    this is the padded forward up to floating-point rounding.
    """
    from transformers import DynamicCache

    ids, mask = batch['input_ids'], batch['attention_mask'].long()
    conts = batch['continuation_indices']
    dev, n_rows = ids.device, ids.shape[0]
    first = [int(c[0]) - 1 for c in conts]  # first scored position of each row (predicts the continuation)
    stop = [int(c[-1]) for c in conts]      # one past its last (the last token predicts nothing)
    groups, prefixes = _shared_prefixes(ids, mask, batch.get('choice_groupings') or
                                        [(r, r + 1) for r in range(n_rows)], first)
    group_of = torch.empty(n_rows, dtype=torch.long)
    shared = [0] * n_rows
    for g, rows in enumerate(groups):
        for r in rows:
            group_of[r], shared[r] = g, prefixes[g]
    keep_arg = _accepts_logits_to_keep(lm)

    # (1) one row per group: its shared prefix, right-padded (masked; causal, so it changes nothing before it)
    cache, prefix_mask = None, ids.new_zeros(n_rows, 0)
    if max(prefixes) > 0:
        p_ids = ids.new_zeros(len(groups), max(prefixes))
        p_mask = torch.zeros_like(p_ids)
        for g, rows in enumerate(groups):
            p_ids[g, :prefixes[g]] = ids[rows[0], :prefixes[g]]
            p_mask[g, :prefixes[g]] = mask[rows[0], :prefixes[g]]
        cache = DynamicCache()
        extra = {'logits_to_keep': torch.empty(0, dtype=torch.long, device=dev)} if keep_arg else {}
        lm(input_ids=p_ids, attention_mask=p_mask, past_key_values=cache, use_cache=True, **extra)
        cache.batch_select_indices(group_of.to(dev))  # one copy of its question's prefix per row
        prefix_mask = p_mask[group_of.to(dev)]

    # (2) every row from its prefix on, right-padded, at its true positions
    width = max(stop[r] - shared[r] for r in range(n_rows))
    r_ids, r_mask = ids.new_zeros(n_rows, width), ids.new_zeros(n_rows, width)
    for r in range(n_rows):
        r_ids[r, :stop[r] - shared[r]] = ids[r, shared[r]:stop[r]]
        r_mask[r, :stop[r] - shared[r]] = mask[r, shared[r]:stop[r]]
    positions = torch.tensor(shared, device=dev)[:, None] + torch.arange(width, device=dev)
    scored = sorted({p - shared[r] for r in range(n_rows) for p in range(first[r], stop[r])})
    extra = {'logits_to_keep': torch.tensor(scored, dtype=torch.long, device=dev)} if keep_arg else {}
    logits = lm(input_ids=r_ids, attention_mask=torch.cat([prefix_mask, r_mask], 1), position_ids=positions,
                past_key_values=cache, use_cache=cache is not None, **extra).logits
    column = torch.full((width,), -1, dtype=torch.long, device=dev)  # rest position -> column of `logits`
    column[scored] = torch.arange(len(scored), device=dev) if keep_arg else torch.tensor(scored, device=dev)
    out = torch.empty(*ids.shape, logits.shape[-1], dtype=logits.dtype, device=logits.device)
    for r in range(n_rows):
        out[r, first[r]:stop[r]] = logits[r].index_select(0, column[first[r] - shared[r]:stop[r] - shared[r]])
    return out


_FAST_ICL_CLASS = None


def _fast_icl_model(model):
    """``model`` (a Composer ``HuggingFaceModel`` over a decoder-only LM) whose ``eval_forward`` on foundry ICL
    batches is :func:`score_icl_batch`; metrics, labels and ``update_metric`` stay the model's own. Other
    models are returned as they are."""
    global _FAST_ICL_CLASS
    from composer.models import ComposerModel, HuggingFaceModel

    if not isinstance(model, HuggingFaceModel) or model.config.is_encoder_decoder:
        return model
    if _FAST_ICL_CLASS is None:
        class FastIclModel(ComposerModel):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, batch):
                return self.inner(batch)

            def loss(self, outputs, batch, *args, **kwargs):
                return self.inner.loss(outputs, batch, *args, **kwargs)

            def get_metrics(self, is_train: bool = False):
                return self.inner.get_metrics(is_train)

            def update_metric(self, batch, outputs, metric):
                return self.inner.update_metric(batch, outputs, metric)

            def eval_forward(self, batch, outputs=None):
                if batch.get('mode') != 'icl_task' or 'continuation_indices' not in batch or outputs is not None:
                    return self.inner.eval_forward(batch, outputs)
                # the labels exactly as HuggingFaceModel.eval_forward leaves them for update_metric
                labels = batch.pop('labels')
                labels[:, :-1] = labels[:, 1:].clone()
                labels[:, -1] = -100
                self.inner.labels = labels
                return score_icl_batch(self.inner.model, batch)

        _FAST_ICL_CLASS = FastIclModel
    return _FAST_ICL_CLASS(model)


def _icl_progress_callback():
    """A Composer callback printing one line per finished ICL task (accuracy, examples, seconds)."""
    from composer.core import Callback

    class IclProgress(Callback):
        def __init__(self):
            self.started = time.perf_counter()
            self.done = 0

        def eval_start(self, state, logger):
            self.started = time.perf_counter()

        def eval_end(self, state, logger):
            self.done += 1
            label = state.dataloader_label
            parts = []
            for name, metric in state.eval_metrics.get(label, {}).items():
                if 'Accuracy' in name:
                    parts.append(f'accuracy {float(metric.compute()):.4f} over {int(getattr(metric, "total", 0))} '
                                 'examples')
            print(f'[darwinlm] ICL task {self.done}: {label} {", ".join(parts)} '
                  f'({time.perf_counter() - self.started:.1f} s)', flush=True)

    return IclProgress()


@contextmanager
def _torch_threads(num_threads: Optional[int]):
    """torch's intra-op threads for the block: ``num_threads``, or (None) the cores this process may use
    shared among the local ranks, when that is more than set (a launcher's OMP_NUM_THREADS=1 would
    otherwise leave the CPU eval on one core)."""
    before = torch.get_num_threads()
    if num_threads is None:
        from composer.utils import dist
        cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
        num_threads = max(before, cores // max(1, dist.get_local_world_size()))
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class IclEvalResult:
    """Accuracy per task (``<label>/<n>-shot``), foundry's gauntlet scores and the plain mean accuracy."""

    tasks: dict[str, float]
    gauntlet: dict[str, float]          # foundry's category scores and 'core_average' (above chance, rescaled)
    gauntlet_average: float
    mean_accuracy: float                # unweighted mean of the task accuracies (the paper's 'avg')
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {'tasks': self.tasks, 'gauntlet': self.gauntlet, 'gauntlet_average': self.gauntlet_average,
                'mean_accuracy': self.mean_accuracy, 'skipped': self.skipped}


def load_darwinlm_composer_model(path, tokenizer):
    """The ``darwinlm`` foundry model over a (pruned or dense) HF checkpoint directory."""
    from llmfoundry.utils.builders import build_composer_model
    return build_composer_model(name='darwinlm', tokenizer=tokenizer,
                                cfg={'pretrained_model_name_or_path': str(path), 'pretrained': True,
                                     'trust_remote_code': False, 'use_train_metrics': False})


def run_icl_eval(model, tokenizer, data_dir, tasks: Sequence[IclTask] = PAPER_TASKS, *,
                 limit: Optional[int] = None, device_eval_batch_size: int = 4, max_seq_len: int = 2048,
                 device: Optional[str] = None, precision: Optional[str] = None, work_dir=None,
                 fast: bool = True, progress: bool = True, num_threads: Optional[int] = None) -> IclEvalResult:
    """Evaluate a Composer model (or a checkpoint directory, loaded as the ``darwinlm`` foundry model) with
    foundry's ICL evaluators and gauntlet through Composer's ``Trainer.eval``; see :func:`build_icl_eval`.

    ``fast`` (default): unpadded batches and, for HF models, :func:`score_icl_batch` (shared prefixes once,
    logits only where scored); ``fast=False`` is foundry's padded evaluation as is (the reference, same
    accuracies). ``progress`` prints a line per finished task. ``num_threads``: torch threads during the eval
    (None: every core this process may use, see :func:`_torch_threads`)."""
    from composer.utils import dist

    from darwinlm_foundry.utils.composer import transient_trainer

    if isinstance(model, (str, os.PathLike)):
        model = load_darwinlm_composer_model(model, tokenizer)
    own_dir = work_dir is None
    work_dir = Path(work_dir or tempfile.mkdtemp(prefix='darwinlm_icl_'))
    try:
        evaluators, _, gauntlet, used = build_icl_eval(
            tokenizer, data_dir, tasks, limit=limit, device_eval_batch_size=device_eval_batch_size,
            max_seq_len=max_seq_len, work_dir=work_dir, fast=fast)
        if not dist.is_initialized():
            dist.initialize_dist('gpu' if torch.cuda.is_available() and device != 'cpu' else 'cpu')
        callbacks = [gauntlet] + ([_icl_progress_callback()] if progress else [])
        with _torch_threads(num_threads), \
                transient_trainer(model=_fast_icl_model(model) if fast else model, device=device,
                                  precision=precision, callbacks=callbacks, progress_bar=False,
                                  log_to_console=False, loggers=[]) as trainer:
            trainer.eval(eval_dataloader=evaluators)
            accuracies = {}
            for ev in evaluators:
                metrics = trainer.state.eval_metrics[ev.label]
                name = next(n for n in ev.metric_names if 'Accuracy' in n)
                accuracies[ev.label] = float(metrics[name].compute())
            scores = gauntlet.eval_after_all(trainer.state, None)
    finally:
        if own_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    prefix = 'icl/metrics/eval_gauntlet/'
    gauntlet_scores = {k[len(prefix):]: float(v) for k, v in scores.items()}
    skipped = [t.key for t in tasks if t not in used]
    return IclEvalResult(tasks=accuracies, gauntlet=gauntlet_scores,
                         gauntlet_average=gauntlet_scores['core_average'],
                         mean_accuracy=sum(accuracies.values()) / len(accuracies), skipped=skipped)
