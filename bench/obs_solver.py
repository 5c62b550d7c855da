"""Benchmark: fast structured OBS (``structured_obs``) vs the research-code-style baseline.

Runs both solvers on the same (W, H) for two Llama-like unit shapes scaled to a CPU:

* MLP ``down_proj`` 1024 x 2816, group 1. Levels: 256 columns per level (a multiple of 32),
  keep = 2816 - 256 * level for levels 0..9 (2816 .. 512) and 0 at level 10 (unit removed).
* attention ``o_proj`` 1024 x 1024, 16 heads of 64. Levels: keep = floor(16 * (10 - level) / 10)
  = 16, 14, 12, 11, 9, 8, 6, 4, 3, 1, 0 (rounded-down equal steps; level 10 keeps 0).

H = 2 X^T X / n from synthetic correlated activations (low-rank + noise, log-normal per-channel scales,
a few dead channels). Prints per shape: seconds of ours and of the baseline, speed-up, whether the kept
sets are identical at every level; then the database byte ratio of storing, per level, only the kept
columns' compensated weights and the kept indices, against 11 dense copies of the output matrix.

The last line is: ``speedup=<x.xx> identical=<True|False> db_bytes_ratio=<x.xxx>``.

    python bench/obs_solver.py [--quick] [--dtype float64|float32] [--threads N]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from darwinlm_foundry.obs.solver import ObsLevel, structured_obs, structured_obs_naive

LEVELS = 10  # levels 0..10, level 10 = unit removed


@dataclass(frozen=True)
class Case:
    """One benchmarked unit: output matrix shape, structure size and keep count per level."""
    name: str
    rows: int
    cols: int
    group_size: int
    keep_counts: tuple[int, ...]


def mlp_keep_counts(columns: int, step: int) -> tuple[int, ...]:
    """Equal steps of ``step`` columns for levels 0..9, and 0 at level 10 (the unit removed)."""
    keeps = tuple(columns - step * lvl for lvl in range(LEVELS)) + (0,)
    if keeps[-2] <= 0:
        raise ValueError(f'step {step} too large for {columns} columns and {LEVELS} levels.')
    return keeps


def attn_keep_counts(heads: int) -> tuple[int, ...]:
    """Rounded-down proportional head counts: floor(heads * (10 - level) / 10), level 10 keeps 0."""
    return tuple(heads * (LEVELS - lvl) // LEVELS for lvl in range(LEVELS + 1))


def make_problem(rows: int, cols: int, samples: int, rank: int, dead: int, seed: int,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Random W (rows, cols) and H = 2 X^T X / n with X low-rank + noise, outlier channels, dead channels."""
    gen = torch.Generator().manual_seed(seed)
    Z = torch.randn(samples, rank, generator=gen, dtype=torch.float64)
    A = torch.randn(rank, cols, generator=gen, dtype=torch.float64)
    X = Z @ A / rank ** 0.5 + 0.3 * torch.randn(samples, cols, generator=gen, dtype=torch.float64)
    X *= torch.exp(0.5 * torch.randn(cols, generator=gen, dtype=torch.float64))  # channel scales
    X[:, torch.randperm(cols, generator=gen)[:dead]] = 0
    H = 2 * X.T @ X / samples
    W = 0.02 * torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    return W.to(dtype), H.to(dtype)


def db_bytes_ratio(cases: list[Case], bytes_per_weight: int = 2, bytes_per_index: int = 8) -> float:
    """Bytes of the level database (kept columns' weights + kept indices per level) over 11 dense copies.

    Kept scheme: sum over levels of keep * group_size * rows * bytes_per_weight + keep * bytes_per_index.
    Dense scheme (research code): one full rows x cols output matrix per level.
    """
    stored = dense = 0
    for c in cases:
        stored += sum(k * c.group_size * c.rows * bytes_per_weight + k * bytes_per_index for k in c.keep_counts)
        dense += len(c.keep_counts) * c.rows * c.cols * bytes_per_weight
    return stored / dense


def measured_db_bytes_ratio(hidden: int, heads: int, intermediate: int, seq_len: int = 128) -> float:
    """Build a real one-layer database (bf16 weights) at the bench shapes and compare its bytes on disk with
    storing a full dense output matrix at every level (the research code's format)."""
    import tempfile

    import transformers

    from darwinlm_foundry.obs.database import build_database
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=intermediate,
                                      num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=heads,
                                      head_dim=hidden // heads)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    batches = [torch.randint(0, 256, (4, seq_len), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    with tempfile.TemporaryDirectory() as tmp:
        db = build_database(model, batches, tmp, weight_dtype=torch.bfloat16)
        return db.storage_bytes() / db.dense_per_level_bytes()


def same_selection(a: list[ObsLevel], b: list[ObsLevel]) -> bool:
    """True if both runs kept exactly the same structures at every level."""
    return len(a) == len(b) and all(x.keep == y.keep and torch.equal(x.kept, y.kept) for x, y in zip(a, b))


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--quick', action='store_true', help='small shapes, runs in seconds')
    p.add_argument('--dtype', choices=('float64', 'float32'), default='float64',
                   help='compute dtype of both solvers (default float64)')
    p.add_argument('--block-size', type=int, default=128, help='structured_obs refresh interval (steps)')
    p.add_argument('--threads', type=int, default=1,
                   help='torch threads (default 1: steadier timings on a shared CPU; 0 = torch default)')
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    if args.quick:
        cases = [Case('mlp down_proj', 256, 704, 1, mlp_keep_counts(704, 64)),
                 Case('attn o_proj', 256, 256, 32, attn_keep_counts(8))]
        samples, rank = 512, 32
    else:
        cases = [Case('mlp down_proj', 1024, 2816, 1, mlp_keep_counts(2816, 256)),
                 Case('attn o_proj', 1024, 1024, 64, attn_keep_counts(16))]
        samples, rank = 2048, 96
    print(f'dtype={args.dtype} threads={torch.get_num_threads()} block_size={args.block_size}')

    # Warm up both code paths (first-call library initialisation must not count against either).
    Ww, Hw = make_problem(16, 64, 64, 4, dead=1, seed=123, dtype=dtype)
    for fn in (structured_obs, structured_obs_naive):
        for g in (1, 16):
            fn(Ww, Hw, g, [64 // g - 2, 0], compute_dtype=dtype)

    total_ours = total_naive = 0.0
    identical = True
    for i, c in enumerate(cases):
        W, H = make_problem(c.rows, c.cols, samples, rank, dead=max(2, c.cols // 256), seed=args.seed + i,
                            dtype=dtype)
        ours, t_ours = timed(structured_obs, W, H, c.group_size, c.keep_counts,
                             block_size=args.block_size, compute_dtype=dtype)
        naive, t_naive = timed(structured_obs_naive, W, H, c.group_size, c.keep_counts, compute_dtype=dtype)
        same = same_selection(ours, naive)
        max_dw = max((float((x.weight - y.weight).abs().max()) for x, y in zip(ours, naive) if x.weight.numel()),
                     default=0.0)
        identical &= same
        total_ours += t_ours
        total_naive += t_naive
        print(f'{c.name:14s} W {c.rows}x{c.cols} group {c.group_size} keep {list(c.keep_counts)}')
        print(f'{"":14s} ours {t_ours:.2f}s  naive {t_naive:.2f}s  speedup {t_naive / t_ours:.2f}x  '
              f'identical={same}  max|dW|={max_dw:.1e}')
    print(f'db (arithmetic): kept columns + indices per level vs 11 dense copies: {db_bytes_ratio(cases):.3f}')
    hidden, cols, heads = (320, 704, 10) if args.quick else (1024, 2816, 16)
    ratio = measured_db_bytes_ratio(hidden, heads, cols)
    print(f'db (measured, real database files, bf16): {ratio:.3f} of 11 dense output matrices per unit')
    print(f'speedup={total_naive / total_ours:.2f} identical={identical} db_bytes_ratio={ratio:.3f}')


if __name__ == '__main__':
    main()
