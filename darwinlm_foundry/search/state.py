"""Resumable state of the evolutionary search, and the pure generation loop that drives it.

:class:`SearchState` holds everything a killed search needs to continue exactly where it stopped: the
number of completed generations, the parent configuration and its fitness, the history, the exact state of
the mutation RNG and a fingerprint of the settings that produced it. It is saved as JSON after every
generation, atomically (temporary file, fsync, ``os.replace``), so a kill at any moment leaves either the
previous or the new state on disk, never a torn file.

:func:`run_search` is the generation loop with no model code in it: mutation from the state's RNG,
:func:`~darwinlm_foundry.search.selection.run_generation` with a caller-supplied ``evaluate``, update, save. As long
as ``make_evaluate(g)`` is deterministic in ``g`` (fresh samples drawn from a seed and the generation,
not from a running stream), killing after any generation and resuming reproduces the uninterrupted run.
Distributed callers keep every rank's state identical by broadcasting the fitness values inside
``evaluate``; the RNG stream then stays in lockstep by construction.

Pure Python + numpy (no torch, no Composer).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from darwinlm_foundry.search.selection import GenerationResult, SelectionSchedule, run_generation
from darwinlm_foundry.search.space import (DEFAULT_MAX_SWITCHES, LevelBounds, LevelConfig, Rng, assert_same_size,
                                           make_offspring, make_rng, rng_from_state, rng_state)
from darwinlm_foundry.utils.io import atomic_write_json

__all__ = ['SearchState', 'SearchStateError', 'settings_fingerprint', 'run_search', 'STATE_FORMAT']

STATE_FORMAT = 'darwinlm-search-state'
STATE_VERSION = 1


_NO_PROBE = object()


class SearchStateError(RuntimeError):
    """A saved search state cannot be used (corrupt, or from different settings)."""


def settings_fingerprint(settings: Union[Mapping[str, Any], str]) -> str:
    """SHA-256 of the canonical JSON of ``settings`` (a string is taken to be a fingerprint already).

    Put in ``settings`` everything that must not change across a resume: model, target level, schedule,
    seed, data, fitness kind.
    """
    if isinstance(settings, str):
        return settings
    try:
        text = json.dumps(settings, sort_keys=True, separators=(',', ':'))
    except TypeError as err:
        raise TypeError(f'settings must be JSON-serialisable to fingerprint them: {err}') from err
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class SearchState:
    """Everything needed to resume a search.

    - ``generation``: number of completed generations (the next one to run has this index).
    - ``parent`` / ``parent_fitness``: current parent and its last measured fitness (None before any).
    - ``history``: one JSON-friendly record per completed generation (fitness, winner, per-step fitness,
      parent kept or not, offspring made, seconds, and ``probe_fitness`` -- the new parent's fitness on a fixed
      probe sample -- when the search scores one; records written before the probe existed lack it).
    - ``rng_state``: exact state of the mutation RNG (:func:`~darwinlm_foundry.search.space.rng_state`).
    - ``fingerprint``: :func:`settings_fingerprint` of the settings; ``extra``: free-form JSON data.
    """

    parent: LevelConfig
    rng_state: dict
    fingerprint: str
    generation: int = 0
    parent_fitness: Optional[float] = None
    history: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @classmethod
    def new(cls, parent: LevelConfig, seed_or_rng: Union[int, Rng], settings: Union[Mapping[str, Any], str],
            extra: Optional[dict] = None) -> 'SearchState':
        """A fresh state at generation 0; ``seed_or_rng``: an int seed (numpy PCG64) or a generator."""
        rng = make_rng(seed_or_rng) if isinstance(seed_or_rng, int) else seed_or_rng
        return cls(parent=parent, rng_state=rng_state(rng), fingerprint=settings_fingerprint(settings),
                   extra=dict(extra or {}))

    def rng(self) -> Rng:
        """A generator positioned at the saved RNG state."""
        return rng_from_state(self.rng_state)

    # -- (de)serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            'format': STATE_FORMAT,
            'version': STATE_VERSION,
            'generation': self.generation,
            'parent': self.parent.to_dict(),
            'parent_fitness': self.parent_fitness,
            'history': copy.deepcopy(self.history),
            'rng_state': copy.deepcopy(self.rng_state),
            'fingerprint': self.fingerprint,
            'extra': copy.deepcopy(self.extra),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> 'SearchState':
        """Inverse of :meth:`to_dict`; raises ``ValueError`` on any malformed field."""
        if not isinstance(data, Mapping):
            raise ValueError(f'expected a JSON object, got {type(data).__name__}')
        if data.get('format') != STATE_FORMAT:
            raise ValueError(f"not a search state (format is {data.get('format')!r}, expected {STATE_FORMAT!r})")
        if data.get('version') != STATE_VERSION:
            raise ValueError(f"search state version {data.get('version')!r} is not supported "
                             f'(this code reads version {STATE_VERSION})')
        expected = {'format', 'version', 'generation', 'parent', 'parent_fitness', 'history', 'rng_state',
                    'fingerprint', 'extra'}
        missing, unknown = sorted(expected - set(data)), sorted(set(data) - expected)
        if missing or unknown:
            raise ValueError(f'missing keys {missing}, unknown keys {unknown}')
        generation = data['generation']
        if not isinstance(generation, int) or isinstance(generation, bool) or generation < 0:
            raise ValueError(f'generation must be a non-negative integer, got {generation!r}')
        fitness = data['parent_fitness']
        if fitness is not None and not isinstance(fitness, (int, float)):
            raise ValueError(f'parent_fitness must be a number or null, got {fitness!r}')
        if not isinstance(data['history'], list) or len(data['history']) != generation:
            raise ValueError(f'history must be a list with one record per completed generation ({generation})')
        if not isinstance(data['fingerprint'], str) or not isinstance(data['extra'], dict):
            raise ValueError('fingerprint must be a string and extra an object')
        rng_from_state(data['rng_state'])  # validates the RNG state
        return cls(parent=LevelConfig.from_dict(data['parent']), rng_state=dict(data['rng_state']),
                   fingerprint=data['fingerprint'], generation=generation,
                   parent_fitness=None if fitness is None else float(fitness),
                   history=list(data['history']), extra=dict(data['extra']))

    def save(self, path: str) -> None:
        """Write atomically: temporary file in the same directory, fsync, ``os.replace``, fsync the directory."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str, expected_fingerprint: Union[Mapping[str, Any], str, None],
             legacy: Sequence[str] = ()) -> 'SearchState':
        """Read a saved state; refuse (``SearchStateError``) a corrupt file or one from other settings.

        ``expected_fingerprint``: the current settings (mapping) or their fingerprint; ``None`` skips the check.
        ``legacy``: fingerprints of the same settings as older versions computed them; such a state is accepted
        and takes the current fingerprint.
        """
        try:
            with open(path, encoding='utf-8') as f:
                data = json.load(f)
            state = cls.from_dict(data)
        except FileNotFoundError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise SearchStateError(f'search state {path} is corrupt or unreadable ({err}). Delete it to start '
                                   f'the search afresh, or point the run at another output directory.') from err
        if expected_fingerprint is not None:
            expected = settings_fingerprint(expected_fingerprint)
            if state.fingerprint in legacy:  # rewritten at once: a later run with other totals resumes it too
                state.fingerprint = expected
                state.save(path)
            if state.fingerprint != expected:
                raise SearchStateError(f'search state {path} was written with different settings (fingerprint '
                                       f'{state.fingerprint[:12]}..., now {expected[:12]}...). Resuming would mix '
                                       f'two searches: delete the file to start afresh with the new settings, or '
                                       f'change the output directory.')
        return state

    @classmethod
    def load_or_new(cls, path: str, settings: Union[Mapping[str, Any], str],
                    make_new: Callable[[], 'SearchState'], legacy: Sequence[str] = ()) -> 'SearchState':
        """Resume from ``path`` when it exists (same settings required, see :meth:`load`), else ``make_new()``."""
        if os.path.exists(path):
            return cls.load(path, settings, legacy)
        state = make_new()
        if state.fingerprint != settings_fingerprint(settings):
            raise ValueError('make_new() built a state whose fingerprint differs from the settings given')
        return state


def _record(generation: int, result: GenerationResult, num_offspring: int, seconds: float,
            probe_fitness: Any = _NO_PROBE) -> dict:
    summary = result.to_dict()
    record = {
        'generation': generation,
        'fitness': result.fitness,
        'parent_won': result.parent_won,
        'winner': summary['winner'],
        'step_fitnesses': result.step_fitnesses,
        'steps': summary['steps'],
        'num_offspring': num_offspring,
        'seconds': seconds,
    }
    if probe_fitness is not _NO_PROBE:
        record['probe_fitness'] = probe_fitness
    return record


def best_probe_generation(start_probe: Optional[float], history: Sequence[dict]) -> Optional[int]:
    """The generation (0: the start) whose parent has the lowest probe fitness, the earliest on ties; None when no
    parent has one (``history``: the state's records, whose ``probe_fitness`` scores the parent after each)."""
    scored = [(f, g) for g, f in enumerate([start_probe] + [h.get('probe_fitness') for h in history])
              if f is not None]
    return min(scored)[1] if scored else None


def run_search(state: SearchState, n_generations: int,
               make_evaluate: Callable[[int], Callable[[list, int], Sequence[float]]],
               bounds: LevelBounds, schedule: SelectionSchedule, checkpoint_path: Optional[str],
               on_generation: Optional[Callable[[SearchState, GenerationResult], None]] = None,
               score_parent: Optional[Callable[[Any], Optional[float]]] = None,
               max_switches: int = DEFAULT_MAX_SWITCHES) -> SearchState:
    """Run generations until ``state.generation == n_generations`` (a total, so a resume continues).

    Per generation ``g``: ``schedule.offspring`` distinct offspring of the parent by mutation (at most
    ``max_switches`` level switches each) with the state's RNG; ``run_generation(parent, offspring, schedule,
    make_evaluate(g))``; the winner becomes the parent; ``score_parent(winner)`` (if given: e.g. its fitness on a fixed probe sample, comparable across
    generations; it must not draw from the state's RNG) goes into the record as ``probe_fitness``; the state
    (with the advanced RNG) is saved to ``checkpoint_path`` (if not None); then ``on_generation(state, result)``
    is called (for logging; an exception there stops the search after the generation was saved). Mutates and
    returns ``state``.
    """
    if n_generations < state.generation:
        raise ValueError(f'the state has already completed {state.generation} generations, more than the '
                         f'{n_generations} asked for')
    bounds.check(state.parent)
    rng = state.rng()
    while state.generation < n_generations:
        g = state.generation
        start = time.perf_counter()
        offspring = make_offspring(state.parent, schedule.offspring, bounds, rng, max_switches=max_switches)
        for child in offspring:
            assert_same_size(child, state.parent)
        result = run_generation(state.parent, offspring, schedule, make_evaluate(g))
        probe = _NO_PROBE if score_parent is None else score_parent(result.winner)
        state.parent = result.winner
        state.parent_fitness = result.fitness
        state.history.append(_record(g, result, len(offspring), time.perf_counter() - start, probe))
        state.generation = g + 1
        state.rng_state = rng_state(rng)
        if checkpoint_path is not None:
            state.save(checkpoint_path)
        if on_generation is not None:
            on_generation(state, result)
    return state
