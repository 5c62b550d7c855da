"""bench/heldout_separation.py's standard errors against hand-computed values."""

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def _load():
    sys.path.insert(0, str(REPO / 'bench'))  # it imports its sibling reproduce.py
    try:
        spec = importlib.util.spec_from_file_location('heldout_separation', REPO / 'bench' / 'heldout_separation.py')
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(REPO / 'bench'))


def test_ratio_row_stratified_and_unstratified_standard_errors():
    ratio_row = _load().ratio_row
    base = {'a': [0.0] * 3, 'b': [0.0] * 4, 'c': [0.0]}
    nll = {'a': [1.0, 2.0, 3.0], 'b': [5.0, 5.0, 5.0, 7.0], 'c': [4.0]}
    everything = lambda d, i: True  # noqa: E731
    ratio, strat, unstrat = ratio_row(nll, base, everything)
    assert ratio == pytest.approx(math.exp(32 / 8))
    # by hand: var_a = 1, var_b = 1 (ddof 1); c has one sequence and adds nothing
    assert strat == pytest.approx(math.sqrt((3 / 8) ** 2 * 1 / 3 + (4 / 8) ** 2 * 1 / 4))
    assert unstrat == pytest.approx(np.std([1, 2, 3, 5, 5, 5, 7, 4], ddof=1) / math.sqrt(8))
    # differences constant within each domain: no sampling noise in a stratified sample, whatever the domains' gap
    flat = {'a': [1.0] * 3, 'b': [6.0] * 4}
    _, strat, unstrat = ratio_row(flat, {'a': [0.0] * 3, 'b': [0.0] * 4}, everything)
    assert strat == 0.0 and unstrat > 1.0
    # keep() selects the sequences: the first 2 of each domain
    ratio, strat, _ = ratio_row(nll, base, lambda d, i: i < 2)
    assert ratio == pytest.approx(math.exp((1 + 2 + 5 + 5 + 4) / 5))
    assert strat == pytest.approx(math.sqrt((2 / 5) ** 2 * 0.5 / 2))
