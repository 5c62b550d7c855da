"""Micro-scale reproduction of DarwinLM's claims against baselines, on a CPU, from one command.

    python bench/reproduce.py                 # quick mode: under 60 minutes on a 2-core CPU
    python bench/reproduce.py --full          # longer pretraining and searches, TAS at level 6, GQA variant
    python bench/reproduce.py --smoke         # minutes; checks the pipeline, numbers mean nothing

Set-up. A small dense Llama (MHA; ``--full`` adds a GQA variant) is pretrained here with the real Llama-2
tokenizer on the RedPajama text in ``../shared/data/redpajama_sample`` (``--data``), converted once into
disjoint document-level MDS splits: ``train`` (pretraining and post-training), ``calibration`` (OBS
databases, layer importances), ``search`` (fitness and training-aware selection samples) and ``heldout``
(every number in the table; never seen by anything else). Its held-out perplexity curve is recorded.

Every method then prunes the same dense model to the same parameter budget (level 5, then level 6: about
50% / 60% of the block parameters removed), per seed (the seed changes the calibration draw, the search's
random stream and samples, and the post-training data order):

 1. dense                      6. DarwinLM one-shot, KL-only selection (no training in the loop)
 2. uniform, OBS-compensated   7. DarwinLM one-shot, training-aware selection (TAS)
 3. uniform, magnitude         8. 6 and 7 after the same short post-training (N tokens)
 4. ZipLM-like allocation      9. gradual 5 -> post-train -> 6 (search from the trained level-5 model)
 5. ShortGPT layer dropping       against one-shot 6 post-trained on the same total tokens

(4: per-unit levels that minimise the summed layer-wise OBS error at the same total level, exact DP, no
end-to-end fitness. 5: drop the layers whose output is most similar to their input (block influence).)
Held-out perplexity and KL(dense || model) per method, mean and spread over seeds; foundry ICL tasks for
the dense model, and for the pruned ones on tasks where the dense model is above chance.

Writes ``<out>/results.json`` (every number), ``<out>/results.md`` (the tables), plots in ``<out>/plots/``,
every pruned model as a Hugging Face directory (remote code) under ``<out>/models/<variant>/seed<k>/``
(their paths are in ``results.json``, so they can be scored on other held-out text). Re-running resumes:
finished steps are read from ``<out>/ledger.json``, searches and databases resume themselves.

The last line is ``searched_vs_uniform_ppl_ratio=<x> tas_gain=<y> gradual_gain=<z>`` (means over seeds):
x = ppl(7) / ppl(2) at level 5 (< 1: the searched model beats uniform OBS pruning);
y = ppl(6 post-trained) / ppl(7 post-trained) at level 5 (> 1: TAS ahead after training);
z = ppl(one-shot 6 post-trained on 2N tokens) / ppl(gradual 6, N + N tokens) (> 1: gradual ahead).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

SEQ_LEN = 128
SPLITS = {'calibration': 0.04, 'search': 0.06, 'heldout': 0.06, 'train': None}


# ----------------------------------------------------------------------------------------------- budgets
@dataclass(frozen=True)
class ModelShape:
    hidden: int = 320
    layers: int = 6
    heads: int = 10  # LevelSpec needs >= 10 heads for ten levels of one head each
    kv_heads: int = 10
    intermediate: int = 960  # 10 levels of 96 channels (mlp_multiple 32)


@dataclass(frozen=True)
class Budget:
    """Everything that sets the cost of a run (``--quick`` / ``--full`` / ``--smoke``)."""

    variants: tuple = ('mha',)
    pretrain_steps: int = 600
    pretrain_batch: int = 8
    pretrain_lr: float = 3e-3
    pretrain_warmup: int = 30
    pretrain_eval_every: int = 50
    seeds: tuple = (0, 1, 2)
    calibration_sequences: int = 128
    generations: int = 5
    offspring: int = 6
    survivors: tuple = (2, 1)
    fitness_tokens: tuple = (1024, 2048)
    tas_train_tokens: tuple = (1024, 2048)
    tas_lr: float = 1e-4
    level6_selection: str = 'kl'  # 'kl' or 'tas' for the two level-6 searches (one-shot and gradual)
    posttrain_steps: int = 16  # N = steps x batch x 128 tokens; one-shot level 6 gets 2N
    posttrain_batch: int = 8
    posttrain_lr: float = 1e-4  # 3e-4 (where the pretraining cosine ended) made every model worse
    posttrain_warmup: int = 3
    sweep_offspring: tuple = (16,)  # KL-only searches on seed 0: the offspring count's effect on fitness
    sweep_generations: int = 5
    icl_limit: int = 100
    heldout_sequences: int = 0  # 0: the whole held-out split
    shapes: str = 'default'  # 'default' (hidden 320, 6 layers) or 'tiny' (hidden 160, 4 layers: --smoke)

    def __post_init__(self):
        if self.level6_selection not in ('kl', 'tas'):
            raise ValueError(f"level6_selection must be 'kl' or 'tas', got {self.level6_selection!r}")
        if self.shapes not in ('default', 'tiny'):
            raise ValueError(f"shapes must be 'default' or 'tiny', got {self.shapes!r}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f'seeds must be distinct and at least one, got {self.seeds}')
        if len(self.tas_train_tokens) != len(self.survivors) or len(self.fitness_tokens) != len(self.survivors):
            raise ValueError('survivors, fitness_tokens and tas_train_tokens need one entry per selection step, got '
                             f'{self.survivors}, {self.fitness_tokens}, {self.tas_train_tokens}')

    def describe(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def fingerprint(self) -> dict:
        """What finished steps depend on (steps are keyed by variant and seed, so adding either reuses them)."""
        return {k: v for k, v in self.describe().items() if k not in ('variants', 'seeds')}


QUICK = Budget()
FULL = dataclasses.replace(QUICK, variants=('mha', 'gqa'), pretrain_steps=2400, generations=20, offspring=8,
                           survivors=(4, 2, 1), fitness_tokens=(1024, 2048, 4096), tas_train_tokens=(2048, 4096, 8192),
                           level6_selection='tas', posttrain_steps=60, sweep_generations=20)
SMOKE = dataclasses.replace(QUICK, pretrain_steps=6, pretrain_warmup=2, pretrain_eval_every=3, seeds=(0,), calibration_sequences=16,
                            generations=1, offspring=2, survivors=(1,), fitness_tokens=(256,), tas_train_tokens=(256,),
                            posttrain_steps=3, posttrain_warmup=1, sweep_offspring=(2,), sweep_generations=1, icl_limit=8,
                            heldout_sequences=16, shapes='tiny')
SHAPES = {'default': {'mha': ModelShape(), 'gqa': ModelShape(kv_heads=2)},
          'tiny': {'mha': ModelShape(160, 4, 10, 10, 320), 'gqa': ModelShape(160, 4, 10, 2, 320)}}


# ----------------------------------------------------------------------------------------------- ledger
class Ledger:
    """Finished steps of this run (``ledger.json``, rewritten atomically after each): re-runs skip them.

    Valid for one budget and one conversion of the data (the shards' manifest fingerprint): other text or
    other settings start the steps over.
    """

    def __init__(self, path: Path, budget: Budget, data_fingerprint: str):
        self.path = path
        self.key = {'budget': budget.fingerprint(), 'data': data_fingerprint}
        self.data: dict[str, Any] = {}
        if path.is_file():
            data = json.loads(path.read_text())
            if {k: data.get(k) for k in self.key} == self.key:
                self.data = data['steps']
            else:
                # databases and search states refuse other settings: drop them (the dense models are cached
                # by their own fingerprint, which covers the data, and stay when it matches)
                print(f'[reproduce] {path} was written with another budget or other data; starting over',
                      flush=True)
                for sub in ('work', 'models'):
                    shutil.rmtree(path.parent / sub, ignore_errors=True)

    def step(self, key: str, fn: Callable[[], Any]) -> Any:
        if key in self.data:
            return self.data[key]
        t0 = time.time()
        value = fn()
        self.data[key] = value
        tmp = self.path.with_suffix('.tmp')
        tmp.write_text(json.dumps({**self.key, 'steps': self.data}, indent=1))
        os.replace(tmp, self.path)
        print(f'[reproduce] {key}: done in {time.time() - t0:.0f} s', flush=True)
        return value


def log(msg: str) -> None:
    print(f'[reproduce {time.strftime("%H:%M:%S")}] {msg}', flush=True)


# ----------------------------------------------------------------------------------------------- the run
@dataclass
class Context:
    budget: Budget
    out: Path
    shards: Path
    tokenizer: Any
    ledger: Ledger
    results: dict = field(default_factory=dict)


def _models_dir(ctx: Context, variant: str, seed: int) -> Path:
    return ctx.out / 'models' / variant / f'seed{seed}'


def _export(ctx: Context, model, path: Path, dense_dir: str, note: str, levels=None) -> str:
    from darwinlm_foundry.export import export_pruned
    export_pruned(model, path, tokenizer=ctx.tokenizer, base_model=dense_dir, levels=levels, overwrite=True,
                  data_note=f'RedPajama sample ({ctx.shards}); {note}', title=f'DarwinLM reproduction: {path.name}')
    return str(path)


def _load(path: str):
    from darwinlm_foundry.modeling import DarwinLMForCausalLM
    return DarwinLMForCausalLM.from_pretrained(path).eval()


def pretrain(ctx: Context, variant: str) -> dict:
    from darwinlm_foundry.pretrain import pretrain_tiny
    b, shape = ctx.budget, SHAPES[ctx.budget.shapes][variant]
    log(f'pretraining the dense {variant} model ({b.pretrain_steps} steps of {b.pretrain_batch} x {SEQ_LEN} tokens)')
    r = pretrain_tiny(ctx.out / 'dense' / variant, shards_dir=ctx.shards, hidden=shape.hidden, layers=shape.layers,
                      heads=shape.heads, kv_heads=shape.kv_heads, intermediate=shape.intermediate,
                      steps=b.pretrain_steps, seq_len=SEQ_LEN, batch_size=b.pretrain_batch, lr=b.pretrain_lr,
                      warmup=b.pretrain_warmup, eval_seqs=128, eval_every=b.pretrain_eval_every,
                      tokenizer=ctx.tokenizer, verbose=True)
    return {'path': r.path, 'curve': r.curve, 'params': r.params, 'seconds': r.seconds, 'ppl': r.ppl_after,
            'tokens': b.pretrain_steps * b.pretrain_batch * SEQ_LEN}


def calibration_batches(ctx: Context, seed: int) -> list:
    from darwinlm_foundry.data import sample_sequences
    tokens = sample_sequences(ctx.shards / 'calibration', ctx.budget.calibration_sequences, SEQ_LEN, seed=seed)
    return [tokens[i:i + 16] for i in range(0, len(tokens), 16)]


def build_db(ctx: Context, model, db_dir: Path, seed: int, source: str):
    from darwinlm_foundry.database import build_database
    from darwinlm_foundry.levels import LevelSpec
    return build_database(model, calibration_batches(ctx, seed), db_dir,
                          level_spec=LevelSpec.from_config(model.config, mlp_multiple=32),
                          calibration_source=f'{ctx.shards}/calibration seed {seed}', model_name=source)


def search(ctx: Context, db, source_dir: str, out_dir: Path, seed: int, *, tas: bool, level: Optional[int] = 5,
           start: Optional[str] = None, offspring: Optional[int] = None, generations: Optional[int] = None,
           survivors=None, fitness_tokens=None) -> dict:
    from darwinlm_foundry.database import dense_tensor_getter
    from darwinlm_foundry.search import EvolutionarySearch, SearchSettings, ShardTokens
    b = ctx.budget
    fitness_tokens = tuple(fitness_tokens or b.fitness_tokens)
    settings = SearchSettings(
        target_level=level, start_config=start, extra_levels=1 if start else 0,
        generations=generations or b.generations, offspring=offspring or b.offspring,
        survivors=tuple(survivors or b.survivors), fitness_tokens=fitness_tokens,
        train_tokens=tuple(b.tas_train_tokens) if tas else (0,) * len(fitness_tokens), lr=b.tas_lr,
        seq_len=SEQ_LEN, train_batch_size=8, micro_batch_size=8, seed=seed, output_dir=str(out_dir), device='cpu',
        progress_bar=False)
    engine = EvolutionarySearch(settings, db, dense_tensor_getter(source_dir), ShardTokens(ctx.shards / 'search'),
                                tokenizer=ctx.tokenizer)
    t0 = time.time()
    result = engine.run()
    return {'levels': result.winner.to_dict(), 'fitness_history': result.fitness_history(),
            'winner_json': result.json_path, 'seconds': round(time.time() - t0, 1), 'tas': tas,
            'offspring': settings.offspring, 'generations': settings.generations}


def posttrain(ctx: Context, model_dir: str, out_dir: Path, seed: int, steps: int, dense_dir: str, note: str) -> str:
    from darwinlm_foundry.pretrain import fit_causal_lm
    b = ctx.budget
    model = _load(model_dir).train()
    fit_causal_lm(model, ctx.shards, tokenizer=ctx.tokenizer, steps=steps, batch_size=b.posttrain_batch,
                  seq_len=SEQ_LEN, lr=b.posttrain_lr, warmup=b.posttrain_warmup, seed=seed)
    return _export(ctx, model.eval(), out_dir, dense_dir,
                   f'{note}; post-trained {steps} x {b.posttrain_batch} x {SEQ_LEN} tokens at lr {b.posttrain_lr}')


def run_seed(ctx: Context, variant: str, seed: int, dense_dir: str, score: Callable[..., dict]) -> dict:
    """Every method at levels 5 and 6 for one seed: model directories and their held-out scores."""
    from darwinlm_foundry.baselines import (allocate_min_error, block_influence, layer_drop_config,
                                            magnitude_kept, unit_errors)
    from darwinlm_foundry.calibration import collect_hessians
    from darwinlm_foundry.database import SparsityDatabase, dense_tensor_getter, is_complete
    from darwinlm_foundry.search_space import uniform
    from darwinlm_foundry.shrinking import shrink_model

    led, b = ctx.ledger, ctx.budget
    key = f'{variant}/seed{seed}'
    run_dir = ctx.out / 'work' / variant / f'seed{seed}'
    mdir = _models_dir(ctx, variant, seed)
    dense = _load_dense(dense_dir)
    n_layers = dense.config.num_hidden_layers
    n_post = b.posttrain_steps

    def open_db(db_dir: Path, model):
        return SparsityDatabase.open(db_dir, model) if is_complete(db_dir) else None

    db_dir = run_dir / 'db_dense'
    db = open_db(db_dir, dense) or build_db(ctx, dense, db_dir, seed, dense_dir)
    spec = db.level_spec
    max_level = min(spec.max_exact_level('attn'), spec.max_exact_level('mlp'))
    models: dict[str, dict] = {}

    def add(name: str, build: Callable[[], str], **info):
        def make():
            path = build()
            model = _load(path)
            return {'path': path, **score(model), **info}
        models[name] = led.step(f'{key}/{name}', make)
        log(f'{key} {name}: ppl {models[name]["ppl"]:.2f} kl {models[name]["kl"]:.4f} '
            f'params {models[name]["params"]:,}')

    def stitched(name: str, levels: dict, note: str, database=None, source=None):
        database = database or db
        model = database.stitch(levels, dense_tensor_getter(source or dense_dir))
        return _export(ctx, model, mdir / name, dense_dir, note, levels=levels)

    # ---- local signals for the baselines (calibration split, this seed's draw)
    def local_signals():
        batches = calibration_batches(ctx, seed)
        hessians = collect_hessians(dense, batches)
        errors = unit_errors(db, hessians, dense_tensor_getter(dense))
        bi = block_influence(dense, batches)
        return {'errors': {f'{u.layer}/{u.kind}': {str(l): e for l, e in lv.items()} for u, lv in errors.items()},
                'block_influence': bi}
    signals = led.step(f'{key}/local_signals', local_signals)
    from darwinlm_foundry.units import Unit
    errors = {Unit(int(k.split('/')[0]), k.split('/')[1]): {int(l): e for l, e in v.items()}
              for k, v in signals['errors'].items()}

    for level in (5, 6):
        uni = uniform(n_layers, level).to_dict()
        add(f'uniform{level}', lambda: stitched(f'uniform{level}', uni, f'uniform level {level}, OBS'),
            method=2, level=level, levels=uni)
        add(f'magnitude{level}',
            lambda: _export(ctx, shrink_model(dense, magnitude_kept(dense, spec, uni)), mdir / f'magnitude{level}',
                            dense_dir, f'uniform level {level}, magnitude, no compensation', levels=uni),
            method=3, level=level, levels=uni)
        zip_levels = allocate_min_error(errors, n_layers, level, max_level=max_level).to_dict()
        add(f'ziplm{level}', lambda: stitched(f'ziplm{level}', zip_levels, f'level {level}, min summed OBS error'),
            method=4, level=level, levels=zip_levels)
        drop_levels = layer_drop_config(signals['block_influence'], level).to_dict()
        add(f'shortgpt{level}', lambda: stitched(f'shortgpt{level}', drop_levels,
                                                 f'level {level}, layer dropping by block influence'),
            method=5, level=level, levels=drop_levels)

    # ---- DarwinLM one-shot at level 5: KL-only and training-aware selection
    searches = {}
    for name, tas in (('darwinlm5_kl', False), ('darwinlm5_tas', True)):
        searches[name] = led.step(f'{key}/search/{name}',
                                  lambda: search(ctx, db, dense_dir, run_dir / name, seed, tas=tas, level=5))
        add(name, lambda: stitched(name, searches[name]['levels'], f'DarwinLM level 5 search ({name})'),
            method=7 if tas else 6, level=5, levels=searches[name]['levels'])

    # ---- 8: the same short post-training (N tokens) for the KL-only and TAS winners
    for name in ('darwinlm5_kl', 'darwinlm5_tas'):
        add(f'{name}+train', lambda: posttrain(ctx, models[name]['path'], mdir / f'{name}+train', seed, n_post,
                                               dense_dir, name),
            method=8, level=5, levels=models[name]['levels'], train_tokens=n_post * b.posttrain_batch * SEQ_LEN)

    # ---- 9: one-shot level 6 (2N tokens) against gradual 5 -> train -> 6 (N + N tokens)
    tas6 = b.level6_selection == 'tas'
    searches['darwinlm6'] = led.step(f'{key}/search/darwinlm6',
                                     lambda: search(ctx, db, dense_dir, run_dir / 'darwinlm6', seed, tas=tas6, level=6))
    add('darwinlm6', lambda: stitched('darwinlm6', searches['darwinlm6']['levels'], 'DarwinLM level 6 one-shot search'),
        method=9, level=6, levels=searches['darwinlm6']['levels'])
    add('darwinlm6+train2N', lambda: posttrain(ctx, models['darwinlm6']['path'], mdir / 'darwinlm6+train2N', seed,
                                               2 * n_post, dense_dir, 'DarwinLM level 6 one-shot'),
        method=9, level=6, levels=searches['darwinlm6']['levels'], train_tokens=2 * n_post * b.posttrain_batch * SEQ_LEN)

    trained5 = models['darwinlm5_tas+train']['path']
    trained5_model = _load(trained5)
    db5_dir = run_dir / 'db_trained5'
    db5 = open_db(db5_dir, trained5_model) or build_db(ctx, trained5_model, db5_dir, seed, trained5)
    searches['gradual6'] = led.step(f'{key}/search/gradual6', lambda: search(
        ctx, db5, trained5, run_dir / 'gradual6', seed, tas=tas6, level=None,
        start=searches['darwinlm5_tas']['winner_json']))
    add('gradual6', lambda: stitched('gradual6', searches['gradual6']['levels'], 'DarwinLM gradual 5 -> 6 search',
                                     database=db5, source=trained5),
        method=9, level=6, levels=searches['gradual6']['levels'])
    add('gradual6+train', lambda: posttrain(ctx, models['gradual6']['path'], mdir / 'gradual6+train', seed, n_post,
                                            dense_dir, 'DarwinLM gradual 5 -> train -> 6'),
        method=9, level=6, levels=searches['gradual6']['levels'],
        train_tokens=2 * n_post * b.posttrain_batch * SEQ_LEN)  # N before the level-6 search, N after

    # ---- hyper-parameter effect: KL-only searches with more or fewer offspring (seed 0 only)
    if seed == ctx.budget.seeds[0]:
        for n in b.sweep_offspring:
            searches[f'sweep_offspring{n}'] = led.step(f'{key}/search/sweep_offspring{n}', lambda: search(
                ctx, db, dense_dir, run_dir / f'sweep_offspring{n}', seed, tas=False, level=5, offspring=n,
                generations=b.sweep_generations, survivors=(1,), fitness_tokens=(2048,)))
    return {'models': models, 'searches': searches, 'signals': signals}


def _load_dense(path: str):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path).eval()


# ----------------------------------------------------------------------------------------------- n-gram reference
def ngram_reference(train, search, heldout, vocab_size: int, lambdas=tuple(i / 10 for i in range(1, 10))) -> dict:
    """Held-out ppl of count models fitted on ``train``: a yardstick for how much the dense model has learned.

    Token arrays are ``[n, seq_len]``; like the models' ppl, every position after the first of each sequence
    is predicted, from the previous token of the same sequence only. Unigram: add-0.5 counts. Bigram:
    ``lam * c(a, b) / c(a) + (1 - lam) * unigram(b)``, ``lam`` chosen on ``search`` (never on held-out).
    """
    import numpy as np
    train, search, heldout = (np.asarray(t, dtype=np.int64) for t in (train, search, heldout))
    counts = np.bincount(train.ravel(), minlength=vocab_size).astype(np.float64)
    unigram = (counts + 0.5) / (counts.sum() + 0.5 * vocab_size)
    pair_keys, pair_counts = np.unique(train[:, :-1].ravel() * vocab_size + train[:, 1:].ravel(), return_counts=True)
    context_counts = np.bincount(train[:, :-1].ravel(), minlength=vocab_size).astype(np.float64)

    def parts(tokens):
        prev, nxt = tokens[:, :-1].ravel(), tokens[:, 1:].ravel()
        keys = prev * vocab_size + nxt
        at = np.minimum(np.searchsorted(pair_keys, keys), len(pair_keys) - 1)
        pair = np.where(pair_keys[at] == keys, pair_counts[at], 0)
        cond = np.divide(pair, context_counts[prev], out=np.zeros(len(keys)), where=context_counts[prev] > 0)
        return cond, unigram[nxt]

    def ppl(cond, uni, lam):
        return float(np.exp(-np.log(lam * cond + (1 - lam) * uni).mean()))

    on_search = parts(search)
    lam = min(lambdas, key=lambda x: ppl(*on_search, x))
    cond, uni = parts(heldout)
    return {'unigram_ppl': ppl(cond, uni, 0.0), 'bigram_ppl': ppl(cond, uni, lam), 'bigram_lambda': lam,
            'train_tokens': int(train.size)}


# ----------------------------------------------------------------------------------------------- ICL
def icl(ctx: Context, variant: str, dense_dir: str, seed_results: dict) -> dict:
    """foundry ICL on the dense model; pruned level-5 models (first seed) only on tasks above chance."""
    from darwinlm_foundry.eval_stage import EMBEDDED_ICL
    from darwinlm_foundry.evaluation import LOCAL_TASKS, available_tasks, run_icl_eval
    from darwinlm_foundry.log_utils import quiet
    tasks = available_tasks(EMBEDDED_ICL, LOCAL_TASKS)
    limit = ctx.budget.icl_limit

    def evaluate(path, task_list):
        with quiet('composer', 'llmfoundry', 'streaming', 'transformers'):
            # 2 x the pretraining length: the models never saw later positions, and piqa's longest answers
            # (140 tokens) must still fit
            r = run_icl_eval(path, ctx.tokenizer, EMBEDDED_ICL, task_list, limit=limit, device_eval_batch_size=8,
                             max_seq_len=2 * SEQ_LEN, device='cpu')
        return r.tasks

    dense = ctx.ledger.step(f'{variant}/icl/dense', lambda: evaluate(dense_dir, tasks))
    above = []
    for task in tasks:
        acc = dense.get(task.key)
        if acc is None:
            continue
        n = limit
        sigma = math.sqrt(max(task.random_baseline * (1 - task.random_baseline), 1e-6) / n)
        if task.random_baseline > 0 and acc > task.random_baseline + 2 * sigma:
            above.append(task)
    out = {'limit': limit, 'dense': dense, 'chance': {t.key: t.random_baseline for t in tasks},
           'above_chance': [t.key for t in above], 'pruned': {}}
    if above:
        first = seed_results[ctx.budget.seeds[0]]['models']
        for name in ('uniform5', 'magnitude5', 'ziplm5', 'shortgpt5', 'darwinlm5_kl', 'darwinlm5_tas',
                     'darwinlm5_tas+train'):
            out['pruned'][name] = ctx.ledger.step(f'{variant}/icl/{name}',
                                                  lambda: evaluate(first[name]['path'], above))
    return out


# ----------------------------------------------------------------------------------------------- report
ROWS = [  # (label, model key, level)
    ('1 dense', 'dense', 0),
    ('2 uniform, OBS', 'uniform{L}', None), ('3 uniform, magnitude', 'magnitude{L}', None),
    ('4 ZipLM-like (local OBS error)', 'ziplm{L}', None), ('5 ShortGPT layer dropping', 'shortgpt{L}', None),
    ('6 DarwinLM one-shot, KL-only', 'darwinlm5_kl', 5), ('7 DarwinLM one-shot, TAS', 'darwinlm5_tas', 5),
    ('8 DarwinLM KL-only + post-train N', 'darwinlm5_kl+train', 5),
    ('8 DarwinLM TAS + post-train N', 'darwinlm5_tas+train', 5),
    ('DarwinLM one-shot search, level 6', 'darwinlm6', 6), ('9 one-shot 6 + post-train 2N', 'darwinlm6+train2N', 6),
    ('9 gradual 5 -> N -> 6, searched', 'gradual6', 6), ('9 gradual 5 -> N -> 6 + post-train N', 'gradual6+train', 6),
]


def _stats(values: list[float]) -> dict:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {'mean': mean, 'std': std, 'min': min(values), 'max': max(values), 'values': values}


def summarise(variant_result: dict, seeds) -> dict:
    """Per level, per row: ppl / KL / params over seeds; and the three headline ratios."""
    per_seed = variant_result['seeds']
    dense = variant_result['dense_scores']
    tables = {}
    for level in (5, 6):
        rows = []
        for label, key, row_level in ROWS:
            if row_level not in (None, level, 0):
                continue
            if key == 'dense':
                rows.append({'method': label, 'key': key, 'params': dense['params'],
                             'ppl': _stats([dense['ppl']]), 'kl': _stats([0.0])})
                continue
            key = key.format(L=level)
            vals = [per_seed[str(s)]['models'][key] for s in seeds if key in per_seed[str(s)]['models']]
            if not vals:
                continue
            rows.append({'method': label, 'key': key, 'params': vals[0]['params'],
                         'ppl': _stats([v['ppl'] for v in vals]), 'kl': _stats([v['kl'] for v in vals])})
        tables[str(level)] = rows

    def ratio(num: str, den: str) -> dict:
        return _stats([per_seed[str(s)]['models'][num]['ppl'] / per_seed[str(s)]['models'][den]['ppl'] for s in seeds])
    headline = {'searched_vs_uniform_ppl_ratio': ratio('darwinlm5_tas', 'uniform5'),
                'tas_gain': ratio('darwinlm5_kl+train', 'darwinlm5_tas+train'),
                'gradual_gain': ratio('darwinlm6+train2N', 'gradual6+train'),
                'tas_vs_kl_oneshot_ppl_ratio': ratio('darwinlm5_tas', 'darwinlm5_kl'),
                'tas_vs_ziplm_ppl_ratio': ratio('darwinlm5_tas', 'ziplm5'),
                'tas_vs_shortgpt_ppl_ratio': ratio('darwinlm5_tas', 'shortgpt5')}
    return {'tables': tables, 'headline': headline}


def _cell(s: dict, digits: int) -> str:
    if s['std'] == 0 and len(s['values']) == 1:
        return f'{s["mean"]:.{digits}f}'
    return f'{s["mean"]:.{digits}f} ± {s["std"]:.{digits}f}'


def render_markdown(doc: dict) -> str:
    lines = [f'# DarwinLM micro-reproduction ({doc["mode"]} mode)', '',
             f'Command: `{doc["command"]}`; seeds {doc["budget"]["seeds"]}; mean ± sample std over seeds; '
             f'held-out: {doc["heldout_tokens"]:,} tokens never used for calibration, search or training. '
             f'Wall time of this invocation {doc["seconds"] / 60:.1f} min (steps finished earlier are read from '
             'the ledger and not counted).', '']
    for variant, v in doc['variants'].items():
        p = v['pretrain']
        lines += [f'## {variant}: {p["params"]:,} parameters, pretrained on {p["tokens"]:,} tokens '
                  f'(held-out ppl {p["curve"][0][1]:.0f} -> {p["ppl"]:.1f})', '',
                  'Pretraining curve (step: held-out ppl): '
                  + ', '.join(f'{int(s)}: {q:.1f}' for s, q in p['curve']), '']
        if 'ngram' in doc:
            g = doc['ngram']
            lines += [f'For scale, count models on the same held-out tokens: unigram ppl {g["unigram_ppl"]:.1f}, '
                      f'interpolated bigram ppl {g["bigram_ppl"]:.1f} (counts from the {g["train_tokens"]:,} train '
                      f'tokens; lambda {g["bigram_lambda"]:.1f} chosen on the search split). A dense model with a higher '
                      'ppl than the bigram has not yet learned the word-pair statistics.', '']
        for level, rows in v['summary']['tables'].items():
            lines += [f'### Level {level}', '', '| method | params | held-out ppl | KL to dense |', '|---|---|---|---|']
            for r in rows:
                lines.append(f'| {r["method"]} | {r["params"]:,} | {_cell(r["ppl"], 2)} | {_cell(r["kl"], 4)} |')
            lines.append('')
        lines += ['### Ratios (per seed, then mean ± std)', '', '| ratio | value | per seed |', '|---|---|---|']
        for name, s in v['summary']['headline'].items():
            lines.append(f'| {name} | {_cell(s, 3)} | {", ".join(f"{x:.3f}" for x in s["values"])} |')
        icl_res = v.get('icl')
        if icl_res:
            lines += ['', f'### foundry ICL (first {icl_res["limit"]} examples per task)', '',
                      '| task | chance | dense |', '|---|---|---|']
            for task, acc in icl_res['dense'].items():
                lines.append(f'| {task} | {icl_res["chance"].get(task, 0):.2f} | {acc:.3f} |')
            if icl_res['above_chance']:
                lines += ['', 'Pruned (first seed) on tasks where dense is above chance:', '']
                for name, accs in icl_res['pruned'].items():
                    lines.append(f'- {name}: ' + ', '.join(f'{t} {a:.3f}' for t, a in accs.items()))
            else:
                lines += ['', 'The dense model is not above chance (2 sigma) on any task, so the pruned models '
                          'were not scored on them: ICL cannot separate the methods at this scale.']
        lines.append('')
    if len(doc['variants']) > 1:
        lines.append(f'Last line: the first variant ({next(iter(doc["variants"]))}); the others are in their '
                     'ratio tables above.')
    lines.append(doc['last_line'])
    return '\n'.join(lines) + '\n'


def plot(doc: dict, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for variant, v in doc['variants'].items():
        fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
        curve = v['pretrain']['curve']
        axes[0].plot([c[0] for c in curve], [c[1] for c in curve], marker='o')
        if 'ngram' in doc:
            axes[0].axhline(doc['ngram']['bigram_ppl'], color='tab:gray', ls='--', label='interpolated bigram')
            axes[0].legend()
        axes[0].set(yscale='log', xlabel='step', ylabel='held-out ppl', title='dense pretraining')
        for level, rows in v['summary']['tables'].items():
            rows = [r for r in rows if r['key'] != 'dense']
            ax = axes[1] if level == '5' else axes[2]
            ax.barh([r['method'] for r in rows], [r['ppl']['mean'] for r in rows],
                    xerr=[r['ppl']['std'] for r in rows], color='tab:blue')
            ax.axvline(v['dense_scores']['ppl'], color='k', ls='--', label='dense')
            ax.set(xlabel='held-out ppl (mean ± std over seeds)', title=f'level {level}')
            ax.invert_yaxis()
            ax.legend()
        fig.tight_layout()
        path = out / f'{variant}_methods.png'
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(str(path))

        fig, ax = plt.subplots(figsize=(7, 4.5))
        first = v['seeds'][str(doc['budget']['seeds'][0])]['searches']
        for name, s in first.items():
            if name.startswith('sweep_offspring') or name in ('darwinlm5_kl', 'darwinlm5_tas'):
                ax.plot(range(1, len(s['fitness_history']) + 1), s['fitness_history'], marker='.',
                        label=f'{name} ({s["offspring"]} offspring{", TAS" if s["tas"] else ""})')
        ax.set(xlabel='generation', ylabel='fitness of the parent (KL to dense, search sample)',
               title=f'{variant}: search hyper-parameters (seed {doc["budget"]["seeds"][0]}, level 5)')
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f'{variant}_search.png'
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(str(path))
    return paths


# ----------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument('--quick', action='store_true', help='the default: under 60 minutes on a 2-core CPU')
    mode.add_argument('--full', action='store_true', help='longer pretraining and searches, TAS at level 6, GQA')
    mode.add_argument('--smoke', action='store_true', help='a few minutes; checks the pipeline only')
    p.add_argument('--data', default=str(REPO.parent / 'shared' / 'data' / 'redpajama_sample'),
                   help='JSON-lines text to pretrain / calibrate / search / train / evaluate on')
    p.add_argument('--out', default=None, help='output directory (default runs/reproduce/<mode>)')
    p.add_argument('--variants', default=None, help='comma-separated: mha, gqa (default: the mode\'s)')
    p.add_argument('--seeds', default=None, help='comma-separated seeds (default: 0,1,2)')
    p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                   help='override a budget field (repeatable), e.g. --set generations=20 --set offspring=16 '
                        '--set survivors=4,2,1 --set tas_lr=1e-4; fields: ' + ', '.join(f.name for f in
                                                                                  dataclasses.fields(Budget)))
    p.add_argument('--threads', type=int, default=0, help='torch CPU threads (0: torch default)')
    args = p.parse_args(argv)
    name = 'full' if args.full else 'smoke' if args.smoke else 'quick'
    budget = {'full': FULL, 'smoke': SMOKE, 'quick': QUICK}[name]
    if args.variants:
        budget = dataclasses.replace(budget, variants=tuple(args.variants.split(',')))
    if args.seeds:
        budget = dataclasses.replace(budget, seeds=tuple(int(s) for s in args.seeds.split(',')))
    try:
        budget = _override(budget, args.set)
    except ValueError as err:
        p.error(str(err))
    unknown = [v for v in budget.variants if v not in SHAPES['default']]
    if unknown:
        p.error(f'unknown variant(s) {unknown}; choose from {sorted(SHAPES["default"])}')
    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.data).exists():
        p.error(f'--data {args.data} does not exist (expected ../shared/data/redpajama_sample beside the repo)')
    t0 = time.time()
    out = Path(args.out or REPO / 'runs' / 'reproduce' / name).resolve()
    out.mkdir(parents=True, exist_ok=True)

    from darwinlm_foundry.data import convert_to_mds, embedded_tokenizer, sample_sequences
    from darwinlm_foundry.evaluation import HeldoutReference
    from darwinlm_foundry.log_utils import quiet
    tokenizer = embedded_tokenizer()
    shards = out / 'mds'
    # other text than last time: new shards, and the ledger below starts over
    manifest = convert_to_mds(args.data, shards, tokenizer, seq_len=SEQ_LEN, score_key=None, splits=SPLITS, seed=0,
                              overwrite=True)
    ctx = Context(budget=budget, out=out, shards=shards, tokenizer=tokenizer,
                  ledger=Ledger(out / 'ledger.json', budget, manifest['fingerprint']))
    heldout = sample_sequences(shards / 'heldout', budget.heldout_sequences or _num_samples(shards / 'heldout'),
                               SEQ_LEN, seed=0)
    ngram = ngram_reference(*(sample_sequences(shards / split, _num_samples(shards / split), SEQ_LEN, seed=0).numpy()
                              for split in ('train', 'search')), heldout.numpy(), len(tokenizer))

    doc = {'mode': name, 'command': ' '.join(['python bench/reproduce.py'] + (argv if argv is not None else sys.argv[1:])),
           'budget': budget.describe(), 'data': args.data, 'heldout_tokens': int(heldout.numel()), 'ngram': ngram,
           'variants': {}}
    with quiet('composer', 'llmfoundry', 'streaming'):
        for variant in budget.variants:
            pre = ctx.ledger.step(f'{variant}/pretrain', lambda: pretrain(ctx, variant))
            dense_dir = pre['path']
            dense = _load_dense(dense_dir)
            score = HeldoutReference(dense, heldout).score  # the dense side once: each model is one pass
            dense_scores = score(dense)
            log(f'{variant} dense: held-out ppl {dense_scores["ppl"]:.2f}, {dense_scores["params"]:,} parameters')
            seeds = {}
            for seed in budget.seeds:
                seeds[seed] = run_seed(ctx, variant, seed, dense_dir, score)
            icl_res = icl(ctx, variant, dense_dir, seeds)
            v = {'pretrain': pre, 'dense_scores': {**dense_scores, 'path': dense_dir},
                 'seeds': {str(s): r for s, r in seeds.items()}, 'icl': icl_res}
            v['summary'] = summarise(v, budget.seeds)
            doc['variants'][variant] = v
    main_variant = doc['variants'][budget.variants[0]]['summary']['headline']
    doc['last_line'] = (f'searched_vs_uniform_ppl_ratio={main_variant["searched_vs_uniform_ppl_ratio"]["mean"]:.3f} '
                        f'tas_gain={main_variant["tas_gain"]["mean"]:.3f} '
                        f'gradual_gain={main_variant["gradual_gain"]["mean"]:.3f}')
    doc['seconds'] = time.time() - t0  # this invocation (a resumed run counts only what it ran)
    doc['plots'] = plot(doc, out / 'plots')
    (out / 'results.json').write_text(json.dumps(doc, indent=1))
    (out / 'results.md').write_text(render_markdown(doc))
    print((out / 'results.md').read_text())
    print(f'results: {out / "results.json"}, {out / "results.md"}, plots in {out / "plots"}')
    print(doc['last_line'], flush=True)
    return doc


def _override(budget: Budget, items: list) -> Budget:
    """``KEY=VALUE`` strings applied to ``budget``; values parsed as the field's type (tuples: comma lists)."""
    fields = {f.name: f for f in dataclasses.fields(Budget)}
    changes = {}
    for item in items:
        key, sep, value = item.partition('=')
        if not sep or key not in fields:
            raise ValueError(f'--set {item!r}: expected KEY=VALUE with KEY one of {sorted(fields)}')
        current = getattr(budget, key)
        if isinstance(current, tuple):
            kind = type(current[0]) if current else str
            changes[key] = tuple(kind(v) for v in value.split(',') if v)
        else:
            changes[key] = type(current)(value)
    return dataclasses.replace(budget, **changes)


def _num_samples(split_dir: Path) -> int:
    from darwinlm_foundry.data import check_shards
    return check_shards(str(split_dir))['num_samples']


if __name__ == '__main__':
    main()
