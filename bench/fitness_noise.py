"""How many fitness tokens does a DarwinLM selection need on SmolLM2? Selection noise measured, not guessed.

The reproduction's quick search (fitness tokens [512, 1024]) ended *worse* than the uniform model it started
from, and its parent's KL on a fixed probe sample rose over generations: the selection kept offspring that
were better only on the sample they were scored on. This bench measures why, on one generation's candidates:

1. The uniform level-``--level`` parent and ``--offspring`` of its level-switch mutants (the engine's own
   ``make_offspring``, same bounds) are stitched from the reproduction's database.
2. Every candidate is scored on ``--seqs`` search-split sequences (KL(dense || candidate) per sequence)
   and on the held-out domains (the reproduction's held-out tokens: NLL and KL).
3. The engine's selection (offspring -> top ``survivors[0]`` on N1 tokens -> those + the parent on a fresh
   N2 tokens, elitism) is replayed on random disjoint subsets for several (N1, N2) budgets. Each pick is
   judged on the sequences the pick did not see (unbiased "true" KL).

Printed per budget: how often the pick is the truly best candidate, how often it is truly better than the
parent (the generation made progress), and the mean true KL change per generation. Also: the true spread of
the candidates and the rank correlation of search-split KL with held-out NLL (does the fitness generalise).

Needs a reproduction run directory (database, shards, converted model): ``python bench/reproduce.py`` first
(its `quick` output is the default). LAST line:
``tokens_for_progress=<smallest N2 with P(better than parent) >= 0.5 or none> p_better_at_1024=<p>
p_better_at_4096=<p> kl_spread=<std of true KL over candidates> search_heldout_spearman=<rho>
gated_gain_at_4096=<mean true KL gain per generation with gated elitism>``. ``--reuse JSON`` replays a saved run.
"""

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
BUDGETS = ((256, 512), (512, 1024), (1024, 2048), (2048, 4096), (4096, 8192))


def _spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


@torch.no_grad()
def score_sequences(models: list, dense, tokens: torch.Tensor, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(KL, NLL) per model and sequence: token means over each sequence's next-token predictions."""
    from darwinlm_foundry.search.fitness import kl_divergence, next_token_labels, token_nll
    n = tokens.shape[0]
    kl, nll = np.zeros((len(models), n)), np.zeros((len(models), n))
    for i in range(0, n, batch):
        ids = tokens[i:i + batch]
        labels = next_token_labels(ids)
        target = dense(input_ids=ids).logits
        for m, model in enumerate(models):
            logits = model(input_ids=ids).logits
            kl[m, i:i + batch] = kl_divergence(target[:, :-1], logits[:, :-1], reduction='none').mean(-1).numpy()
            nll[m, i:i + batch] = token_nll(logits, labels, reduction='none')[:, :-1].mean(-1).numpy()
        print(f'[fitness_noise {time.strftime("%H:%M:%S")}] scored {min(i + batch, n)}/{n} sequences', flush=True)
    return kl, nll


def replay(kl: np.ndarray, seq_len: int, survivors: int, n1: int, n2: int, trials: int, rng: random.Random) -> dict:
    """The engine's two-step selection (row 0 = parent) on random disjoint subsets, judged on the rest.

    Also replayed: a gated elitism that replaces the parent only when the pick's paired KL gain on the N2
    sample exceeds one standard error of the per-sequence differences (not in the engine; measured here)."""
    k1, k2 = math.ceil(n1 / seq_len), math.ceil(n2 / seq_len)
    n_seq = kl.shape[1]
    if k1 + k2 >= n_seq:
        return {}
    best_hits = better = 0
    gains, gated = [], []
    for _ in range(trials):
        idx = list(range(n_seq))
        rng.shuffle(idx)
        s1, s2, rest = idx[:k1], idx[k1:k1 + k2], idx[k1 + k2:]
        off = 1 + np.argsort(kl[1:, s1].mean(1), kind='stable')[:survivors]
        finalists = [0] + list(off)  # the parent first: it stays unless an offspring is strictly better
        f2 = kl[finalists][:, s2].mean(1)
        pick = finalists[int(np.argmin(f2))]
        true = kl[:, rest].mean(1)
        best_hits += pick == int(np.argmin(true))
        better += true[pick] < true[0]
        gains.append(true[0] - true[pick])
        diff = kl[0, s2] - kl[pick, s2]
        se = diff.std(ddof=1) / math.sqrt(len(diff)) if len(diff) > 1 else math.inf
        gated.append(true[0] - true[pick] if pick and diff.mean() > se else 0.0)
    return {'n1': n1, 'n2': n2, 'p_pick_is_best': best_hits / trials, 'p_better_than_parent': better / trials,
            'mean_true_kl_gain': float(np.mean(gains)), 'gated_true_kl_gain': float(np.mean(gated)),
            'trials': trials}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--run', default=str(REPO / 'runs' / 'reproduce' / 'quick'), help='a reproduction directory')
    p.add_argument('--level', type=int, default=5)
    p.add_argument('--offspring', type=int, default=8)
    p.add_argument('--survivors', type=int, default=2, help='offspring kept after the first step')
    p.add_argument('--seqs', type=int, default=96, help='search-split sequences scored per candidate')
    p.add_argument('--seq-len', type=int, default=512)
    p.add_argument('--heldout-seqs', type=int, default=2, help='held-out sequences per domain')
    p.add_argument('--batch', type=int, default=4)
    p.add_argument('--trials', type=int, default=4000)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default=None, help='JSON output (default <run>/fitness_noise.json)')
    p.add_argument('--reuse', default=None, help="an earlier run's JSON: replay its per-sequence KL, score nothing")
    args = p.parse_args(argv)
    if args.reuse:
        doc = json.loads(Path(args.reuse).read_text())
        kl = np.array(doc['per_sequence_kl'])
        rng = random.Random(args.seed)
        doc['budgets'] = [r for n1, n2 in BUDGETS
                          if (r := replay(kl, args.seq_len, doc['survivors'], n1, n2, args.trials, rng))]
        return report(doc, kl, Path(args.out or args.reuse))

    import reproduce  # the study's run, opened again, and its held-out packing (bench/reproduce.py)
    from darwinlm_foundry.search.space import GROUPS, LevelBounds, LevelConfig, make_offspring, make_rng, uniform
    from darwinlm_foundry.search.tokens import ShardTokens

    t0 = time.time()
    run = Path(args.run).resolve()
    budget = dataclasses.replace(reproduce.QUICK, seq_len=args.seq_len, heldout_sequences=args.heldout_seqs)
    fin = reproduce.open_run(run, budget)
    dense, spec = fin.dense, fin.spec
    n_layers = dense.config.num_hidden_layers
    # The engine's bounds for a uniform start: 0 .. the highest exact-size level, per kind.
    bounds = LevelBounds(uniform(n_layers, 0), LevelConfig(**{g: [spec.max_exact_level(g)] * n_layers
                                                               for g in GROUPS}))
    parent = uniform(n_layers, args.level, mlp_split=spec.mlp_split)
    offspring = make_offspring(parent, args.offspring, bounds, make_rng(args.seed))
    models = [fin.stitch(c) for c in [parent] + offspring]

    search = ShardTokens(fin.ctx.shards / 'search').sample(args.seqs, args.seq_len, seed=10_000 + args.seed).long()
    kl, nll = score_sequences(models, dense, search, args.batch)
    held = torch.cat(list(fin.ctx.heldout().values()))
    hkl, hnll = score_sequences(models, dense, held, args.batch)

    rng = random.Random(args.seed)
    rows = [r for n1, n2 in BUDGETS if (r := replay(kl, args.seq_len, args.survivors, n1, n2, args.trials, rng))]
    true_kl = kl.mean(1)
    search_rho = _spearman(true_kl, hnll.mean(1))
    doc = {'run': str(run), 'level': args.level, 'offspring': len(offspring), 'survivors': args.survivors,
           'search_tokens': int(search.numel()), 'heldout_tokens': int(held.numel()),
           'search_kl_per_candidate': true_kl.tolist(), 'heldout_nll_per_candidate': hnll.mean(1).tolist(),
           'heldout_kl_per_candidate': hkl.mean(1).tolist(),
           'per_sequence_kl_std': float(kl.std(1).mean()), 'kl_spread': float(true_kl[1:].std()),
           'parent_minus_best_offspring_kl': float(true_kl[0] - true_kl[1:].min()),
           'search_heldout_spearman': search_rho, 'budgets': rows, 'seconds': round(time.time() - t0, 1),
           'per_sequence_kl': kl.tolist()}
    return report(doc, kl, Path(args.out) if args.out else run / 'fitness_noise.json')


def report(doc: dict, kl: np.ndarray, out: Path) -> dict:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    true_kl, rows, search_rho = kl.mean(1), doc['budgets'], doc['search_heldout_spearman']
    print(f'candidates: parent (uniform {doc["level"]}) + {doc["offspring"]} offspring; search KL on '
          f'{doc["search_tokens"]:,} tokens: parent {true_kl[0]:.4f}, offspring {np.round(true_kl[1:], 4).tolist()}')
    print(f'per-sequence KL std {doc["per_sequence_kl_std"]:.3f} vs offspring spread {doc["kl_spread"]:.4f} '
          f'(parent - best offspring {doc["parent_minus_best_offspring_kl"]:+.4f}); Spearman(search KL, held-out '
          f'NLL) {search_rho:.2f}')
    print('| fitness tokens (N1, N2) | P(pick = truly best) | P(pick truly better than parent) | mean true KL gain '
          '| same, gated elitism (> 1 SE) |')
    print('|---|---|---|---|---|')
    for r in rows:
        print(f'| {r["n1"]}, {r["n2"]} | {r["p_pick_is_best"]:.2f} | {r["p_better_than_parent"]:.2f} | '
              f'{r["mean_true_kl_gain"]:+.4f} | {r["gated_true_kl_gain"]:+.4f} |')
    print(f'written {out} in {doc["seconds"]:.0f} s')
    at = {r['n2']: r['p_better_than_parent'] for r in rows}
    enough = next((r['n2'] for r in rows if r['p_better_than_parent'] >= 0.5), 'none')
    print(f'tokens_for_progress={enough} p_better_at_1024={at.get(1024, float("nan")):.2f} '
          f'p_better_at_4096={at.get(4096, float("nan")):.2f} kl_spread={doc["kl_spread"]:.4f} '
          f'search_heldout_spearman={search_rho:.2f} gated_gain_at_4096='
          f'{next((r["gated_true_kl_gain"] for r in rows if r["n2"] == 4096), float("nan")):+.4f}', flush=True)
    return doc


if __name__ == '__main__':
    sys.exit(0 if main() else 1)
