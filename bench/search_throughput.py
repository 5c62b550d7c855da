"""Offspring evaluations per minute: stitched shrunk offspring (ours) vs zeroed dense copies (research code).

Both sides run the same engine code path (:meth:`EvolutionarySearch.evaluate`: build the candidate, a short
Composer ``Trainer.fit`` on the same training tokens at lr 1e-5, then KL to the dense model on the same
fitness tokens) over the same offspring of the uniform level-L model, in one process, one after the other:

* ours:  ``database.stitch`` -> a physically shrunk ``DarwinLMForCausalLM`` (only kept weights exist);
* naive: ``shrinking.mask_model`` -> a deep copy of the dense model with the pruned structures zeroed (what
  the research code trains; the zeros are trained and regrow, and every step costs the dense compute).

The model is a randomly initialised Llama-2-shaped (multi-head attention) tiny model whose blocks dominate
the compute, as in real LLMs (in Llama-2-7B the LM head is ~2% of the FLOPs); weights do not change
throughput, so no pretraining is needed. Dense targets are computed once before timing. The last line is
``offspring_per_min_ratio=<ours / naive> level=<L>``.

    python bench/search_throughput.py [--level 5] [--offspring 6] [--threads 1] [--device cpu]
"""

import argparse
import json
import os
import tempfile
import time

import torch

from darwinlm_foundry.obs.database import build_database, dense_tensor_getter
from darwinlm_foundry.search.engine import EvolutionarySearch
from darwinlm_foundry.search.settings import SearchSettings
from darwinlm_foundry.search.space import make_offspring, make_rng, uniform
from darwinlm_foundry.search.tokens import TensorTokens
from darwinlm_foundry.utils.params import count_parameters


def _model(args):
    import transformers
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                                      num_hidden_layers=args.layers, num_attention_heads=10, num_key_value_heads=10,
                                      head_dim=args.hidden // 10, max_position_embeddings=args.seq_len,
                                      tie_word_embeddings=False)
    config._attn_implementation = 'sdpa'
    return transformers.LlamaForCausalLM(config).eval()


def _measure(engines, candidates):
    """Evaluate every candidate with each engine, interleaved (ours, naive, ours, ...) so that both sides
    see the same machine load; return offspring per minute per engine."""
    for engine in engines.values():
        engine.evaluate(candidates[:1], 0, 0)  # warm-up: imports, first Trainer, allocator
    seconds = {name: 0.0 for name in engines}
    before = {name: dict(e.stats) for name, e in engines.items()}
    for candidate in candidates:
        for name, engine in engines.items():
            t0 = time.perf_counter()
            engine.evaluate([candidate], 0, 0)
            seconds[name] += time.perf_counter() - t0
    per_min = {}
    for name, engine in engines.items():
        per_min[name] = len(candidates) / seconds[name] * 60
        parts = {k: round(engine.stats[k] - before[name][k], 2)
                 for k in ('stitch_seconds', 'fit_seconds', 'trainer_init_seconds', 'fitness_seconds')}
        print(f'{name:>6}: {len(candidates)} offspring in {seconds[name]:.1f} s = {per_min[name]:.1f} offspring/min  '
              f'{parts}', flush=True)
    return per_min


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--level', type=int, default=5)
    p.add_argument('--offspring', type=int, default=6)
    p.add_argument('--hidden', type=int, default=320)
    p.add_argument('--layers', type=int, default=4)
    p.add_argument('--vocab', type=int, default=512)
    p.add_argument('--seq-len', type=int, default=128)
    p.add_argument('--train-tokens', type=int, default=4096)
    p.add_argument('--fitness-tokens', type=int, default=2048)
    p.add_argument('--threads', type=int, default=1,
                   help='torch CPU threads (1 = stable numbers on a shared CPU; 0 = torch default)')
    p.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    model = _model(args)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (64, args.seq_len), generator=g)
    work = tempfile.mkdtemp(prefix='darwinlm_search_bench_')
    db = build_database(model, [tokens[i:i + 4] for i in range(0, 16, 4)], os.path.join(work, 'db'),
                        calibration_source='random tokens (throughput only)')
    print(f'model: {count_parameters(model):,} parameters, level {args.level}: '
          f'{db.level_spec.parameter_count(args.level):,}; database built in {time.perf_counter() - t0:.1f} s',
          flush=True)

    rng = make_rng(0)
    candidates = make_offspring(uniform(args.layers, args.level), args.offspring, _bounds(db), rng)
    settings = dict(target_level=args.level, generations=1, offspring=args.offspring, survivors=(1,),
                    fitness_tokens=(args.fitness_tokens,), train_tokens=(args.train_tokens,), seq_len=args.seq_len,
                    train_batch_size=8, micro_batch_size=8, device=args.device, progress_bar=False)
    getter = dense_tensor_getter(model)
    engines = {}
    for name, fmt in (('ours', 'shrunk'), ('naive', 'masked')):
        engines[name] = EvolutionarySearch(SearchSettings(**settings, output_dir=os.path.join(work, fmt)), db,
                                           getter, TensorTokens(tokens), offspring_format=fmt)
        engines[name].prefill_dense(0)
    rates = _measure(engines, candidates)
    ours, naive = rates['ours'], rates['naive']
    print(json.dumps({'ours_offspring_per_min': round(ours, 2), 'naive_offspring_per_min': round(naive, 2),
                      'threads': torch.get_num_threads(), 'device': args.device,
                      'total_seconds': round(time.perf_counter() - t0, 1)}))
    print(f'offspring_per_min_ratio={ours / naive:.2f} level={args.level}')


def _bounds(db):
    from darwinlm_foundry.search.space import LevelBounds
    return LevelBounds.full(db.level_spec.num_layers, max_level=min(db.level_spec.max_exact_level(k)
                                                                    for k in ('attn', 'mlp')))


if __name__ == '__main__':
    main()
