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

``--start-of SEED``: the parent is that seed's level-5 KL-only search start (kind balance + protection) with that
search's bounds, instead of the uniform model. ``--chunk C`` also keeps the KL per C positions and replays
fitness samples of shorter windows (each a different sequence's first W = C, 2C, .. tokens: more documents for
the same tokens) judged on whole unseen sequences. ``--bf16``: forwards in bf16 autocast, as the study searches.
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
def score_sequences(models: list, dense, tokens: torch.Tensor, batch: int, chunk: int = 0,
                    bf16: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(KL, NLL) per model and sequence: token means over each sequence's next-token predictions.

    With ``chunk`` the KL is kept per ``chunk`` positions too (shape models x sequences x chunks; chunk ``c``
    holds predictions ``c*chunk .. (c+1)*chunk - 1``): a causal model's first ``w`` predictions of a sequence
    are exactly what a ``w``-token window would give, so shorter fitness windows are replayed from one scoring.
    ``bf16`` autocasts the forwards as the study's searches do (the KL itself is fp32)."""
    from darwinlm_foundry.search.fitness import kl_divergence, next_token_labels, token_nll
    n, positions = tokens.shape[0], tokens.shape[1] - 1
    n_chunks = math.ceil(positions / chunk) if chunk else 1
    kl, nll = np.zeros((len(models), n, n_chunks)), np.zeros((len(models), n))
    cast = torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16)
    for i in range(0, n, batch):
        ids = tokens[i:i + batch]
        labels = next_token_labels(ids)
        with cast:
            target = dense(input_ids=ids).logits.float()
        for m, model in enumerate(models):
            with cast:
                logits = model(input_ids=ids).logits.float()
            per_token = kl_divergence(target[:, :-1], logits[:, :-1], reduction='none')
            for c in range(n_chunks):
                span = per_token[:, c * chunk:(c + 1) * chunk] if chunk else per_token
                kl[m, i:i + batch, c] = span.mean(-1).numpy()
            nll[m, i:i + batch] = token_nll(logits, labels, reduction='none')[:, :-1].mean(-1).numpy()
        print(f'[fitness_noise {time.strftime("%H:%M:%S")}] scored {min(i + batch, n)}/{n} sequences', flush=True)
    return (kl if chunk else kl[..., 0]), nll


def sequence_kl(klc: np.ndarray, chunks: int = 0) -> np.ndarray:
    """Per-sequence KL from per-chunk KL: the mean over the first ``chunks`` chunks (0: all), position-weighted
    (every chunk is full but perhaps the last, which is one position short of the others at most)."""
    return klc[..., :chunks or klc.shape[-1]].mean(-1)


def replay(kl: np.ndarray, seq_len: int, survivors: int, n1: int, n2: int, trials: int, rng: random.Random,
           select: np.ndarray = None) -> dict:
    """The engine's two-step selection (row 0 = parent) on random disjoint subsets, judged on the rest.

    ``select``: what the selection sees of each sequence (default ``kl``; fitness windows: the KL of each
    sequence's first ``seq_len`` tokens), while the pick is judged on ``kl`` of the sequences it did not see.
    Also replayed: a gated elitism that replaces the parent only when the pick's paired KL gain on the N2
    sample exceeds one standard error of the per-sequence differences (not in the engine; measured here)."""
    sel = kl if select is None else select
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
        off = 1 + np.argsort(sel[1:, s1].mean(1), kind='stable')[:survivors]
        finalists = [0] + list(off)  # the parent first: it stays unless an offspring is strictly better
        f2 = sel[finalists][:, s2].mean(1)
        pick = finalists[int(np.argmin(f2))]
        true = kl[:, rest].mean(1)
        best_hits += pick == int(np.argmin(true))
        better += true[pick] < true[0]
        gains.append(true[0] - true[pick])
        diff = sel[0, s2] - sel[pick, s2]
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
    p.add_argument('--start-of', type=int, default=None, metavar='SEED',
                   help="the parent is that seed's level-5 KL-only search start (default: the uniform model)")
    p.add_argument('--chunk', type=int, default=0,
                   help='keep KL per CHUNK positions and replay fitness windows of 1, 2, .. chunks (0: off)')
    p.add_argument('--bf16', action='store_true', help='bf16 autocast forwards, as the study searches')
    args = p.parse_args(argv)
    if args.reuse:
        doc = json.loads(Path(args.reuse).read_text())
        kl = np.array(doc['per_sequence_kl'])
        klc = np.array(doc['per_chunk_kl']) if doc.get('chunk') else None
        rng = random.Random(args.seed)
        doc['budgets'] = [r for n1, n2 in BUDGETS
                          if (r := replay(kl, args.seq_len, doc['survivors'], n1, n2, args.trials, rng))]
        if klc is not None:
            doc['windows'] = window_rows(klc, doc['chunk'], args.seq_len, doc['survivors'], args.trials, rng)
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
    if args.start_of is None:
        bounds = LevelBounds(uniform(n_layers, 0), LevelConfig(**{g: [spec.max_exact_level(g)] * n_layers
                                                                   for g in GROUPS}))
        parent = uniform(n_layers, args.level, mlp_split=spec.mlp_split)
    else:  # a real search's start (kind balance + protection) and that search's bounds
        winner = json.loads((run / 'work' / f'seed{args.start_of}' / f'darwinlm{args.level}_kl' / 'winner.json')
                            .read_text())
        parent, bounds = LevelConfig.from_dict(winner['start']), fin.bounds(args.start_of, args.level)
    offspring = make_offspring(parent, args.offspring, bounds, make_rng(args.seed))
    models = [fin.stitch(c) for c in [parent] + offspring]

    search = ShardTokens(fin.ctx.shards / 'search').sample(args.seqs, args.seq_len, seed=10_000 + args.seed).long()
    klc, nll = score_sequences(models, dense, search, args.batch, chunk=args.chunk, bf16=args.bf16)
    kl = sequence_kl(klc) if args.chunk else klc
    held = torch.cat(list(fin.ctx.heldout().values()))
    hkl, hnll = score_sequences(models, dense, held, args.batch, bf16=args.bf16)

    rng = random.Random(args.seed)
    rows = [r for n1, n2 in BUDGETS if (r := replay(kl, args.seq_len, args.survivors, n1, n2, args.trials, rng))]
    windows = window_rows(klc, args.chunk, args.seq_len, args.survivors, args.trials, rng) if args.chunk else None
    true_kl = kl.mean(1)
    search_rho = _spearman(true_kl, hnll.mean(1))
    doc = {'run': str(run), 'level': args.level, 'offspring': len(offspring), 'survivors': args.survivors,
           'search_tokens': int(search.numel()), 'heldout_tokens': int(held.numel()),
           'search_kl_per_candidate': true_kl.tolist(), 'heldout_nll_per_candidate': hnll.mean(1).tolist(),
           'heldout_kl_per_candidate': hkl.mean(1).tolist(),
           'per_sequence_kl_std': float(kl.std(1).mean()), 'kl_spread': float(true_kl[1:].std()),
           'parent_minus_best_offspring_kl': float(true_kl[0] - true_kl[1:].min()),
           'search_heldout_spearman': search_rho, 'budgets': rows, 'seconds': round(time.time() - t0, 1),
           'per_sequence_kl': kl.tolist(), 'parent': parent.to_dict(), 'bf16': args.bf16}
    if args.chunk:
        doc.update(chunk=args.chunk, windows=windows, per_chunk_kl=klc.tolist())
    return report(doc, kl, Path(args.out) if args.out else run / 'fitness_noise.json')


def window_rows(klc: np.ndarray, chunk: int, seq_len: int, survivors: int, trials: int, rng) -> list:
    """:func:`replay` with fitness samples of windows (each a different sequence's first ``window`` tokens, for
    every window of whole chunks below ``seq_len``) at the budgets of :data:`BUDGETS`, judged on whole sequences."""
    full = sequence_kl(klc)
    return [{'window': window, **r} for window in range(chunk, seq_len, chunk) for n1, n2 in BUDGETS
            if (r := replay(full, window, survivors, n1, n2, trials, rng, select=sequence_kl(klc, window // chunk)))]


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
    if doc.get('windows'):
        print('Fitness samples of windows (each a different sequence\'s first W tokens), judged on whole unseen '
              'sequences (whole sequences: the table above):')
        print('| window W | fitness tokens (N1, N2) | P(pick = truly best) | P(pick truly better than parent) | '
              'mean true KL gain |')
        print('|---|---|---|---|---|')
        for r in doc['windows']:
            print(f'| {r["window"]} | {r["n1"]}, {r["n2"]} | {r["p_pick_is_best"]:.2f} | '
                  f'{r["p_better_than_parent"]:.2f} | {r["mean_true_kl_gain"]:+.4f} |')
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
