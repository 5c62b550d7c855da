"""Tests of the structured OBS solver (darwinlm_foundry.obs.solver): pure torch, tiny sizes, float64."""

from __future__ import annotations

import pytest
import torch

from darwinlm_foundry.obs import solver as obs_solver
from darwinlm_foundry.obs.solver import (ObsLevel, layer_loss, prepare_hessian, structured_obs,
                                         structured_obs_naive)

DT = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: one thread avoids OpenMP stalls on a shared CPU (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_problem(rows: int, cols: int, samples: int = 64, dead: tuple[int, ...] = (), seed: int = 0):
    """Random W and H = 2 X^T X / n from correlated activations; `dead` input columns always zero."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(samples, cols, generator=gen, dtype=DT)
    X = X + 0.5 * torch.randn(samples, 3, generator=gen, dtype=DT) @ torch.randn(3, cols, generator=gen, dtype=DT)
    X[:, list(dead)] = 0
    W = torch.randn(rows, cols, generator=gen, dtype=DT)
    return W, 2 * X.T @ X / samples


def columns(structures, g: int) -> torch.Tensor:
    s = torch.as_tensor(list(structures), dtype=torch.long)
    return (s.view(-1, 1) * g + torch.arange(g)).view(-1)


def ls_optimum(W: torch.Tensor, Hd: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """argmin over W_hat supported on `cols` of tr((W - W_hat) Hd (W - W_hat)^T): W Hd[:, K] Hd[K, K]^-1."""
    return torch.linalg.solve(Hd[cols][:, cols], (W @ Hd[:, cols]).T).T


def loss_of_kept(W: torch.Tensor, Hd: torch.Tensor, kept, g: int) -> float:
    """Exact loss of keeping the structures `kept` with optimal compensation (brute force)."""
    cols = columns(kept, g)
    W_hat = torch.zeros_like(W)
    if len(cols):
        W_hat[:, cols] = ls_optimum(W, Hd, cols)
    return layer_loss(W, W_hat, Hd)


def zero_dead(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    W = W.clone()
    W[:, H.diagonal() == 0] = 0
    return W


def reference_greedy(W: torch.Tensor, H: torch.Tensor, g: int, damp: float = 0.01) -> list[list[int]]:
    """The greedy path from scratch: each step removes the structure whose removal (with optimal
    re-fit of all the rest) gives the least loss. Returns the kept set after each step."""
    Hd, W = prepare_hessian(H, damp), zero_dead(W, H)
    kept = list(range(W.shape[1] // g))
    path = [list(kept)]
    while kept:
        losses = [loss_of_kept(W, Hd, [t for t in kept if t != s], g) for s in kept]
        kept.remove(kept[min(range(len(kept)), key=losses.__getitem__)])
        path.append(list(kept))
    return path


SOLVERS = [pytest.param(structured_obs, id='fast'), pytest.param(structured_obs_naive, id='naive')]


@pytest.mark.parametrize('solver', SOLVERS)
@pytest.mark.parametrize('rows,cols,g', [(7, 10, 1), (5, 12, 3)])
def test_first_choice_minimises_exact_error(solver, rows, cols, g):
    W, H = make_problem(rows, cols, seed=1)
    Hd = prepare_hessian(H)
    n = cols // g
    exact = [loss_of_kept(W, Hd, [t for t in range(n) if t != s], g) for s in range(n)]
    (level,) = solver(W, H, g, [n - 1])
    removed = sorted(set(range(n)) - set(level.kept.tolist()))
    best = min(range(n), key=exact.__getitem__)
    assert removed == [best]
    assert level.error == pytest.approx(exact[best], rel=1e-10)
    assert sorted(exact)[1] > exact[best] * (1 + 1e-6)  # the test problem has a unique best choice


@pytest.mark.parametrize('solver', SOLVERS)
@pytest.mark.parametrize('rows,cols,g,dead', [(9, 16, 1, ()), (6, 24, 4, ()), (8, 20, 2, (3, 11))])
def test_weights_are_least_squares_optimum_at_every_level(solver, rows, cols, g, dead):
    W, H = make_problem(rows, cols, dead=dead, seed=2)
    Hd, Wz = prepare_hessian(H), zero_dead(W, H)
    n = cols // g
    levels = solver(W, H, g, list(range(n, -1, -1)))
    for lvl in levels + solver(W, H, g, [n // 2, 1]):  # also with many greedy steps between two levels
        cols_k = columns(lvl.kept.tolist(), g)
        assert lvl.weight.shape == (rows, len(cols_k))
        assert lvl.kept.dtype == torch.long and lvl.kept.tolist() == sorted(lvl.kept.tolist())
        W_hat = torch.zeros_like(Wz)
        if len(cols_k):
            opt = ls_optimum(Wz, Hd, cols_k)
            torch.testing.assert_close(lvl.weight, opt, rtol=1e-9, atol=1e-10)
            W_hat[:, cols_k] = lvl.weight
        assert lvl.error == pytest.approx(layer_loss(Wz, W_hat, Hd), rel=1e-9, abs=1e-12)
    errors = [lvl.error for lvl in levels]
    assert errors == sorted(errors)  # removing more never lowers the loss


@pytest.mark.parametrize('rows,cols,g', [(3, 8, 1), (4, 12, 2), (2, 15, 3)])
def test_greedy_path_equals_reference(rows, cols, g):
    W, H = make_problem(rows, cols, seed=3)
    path = reference_greedy(W, H, g)
    n = cols // g
    for solver in (structured_obs, structured_obs_naive):
        levels = solver(W, H, g, list(range(n, -1, -1)))
        assert [lvl.kept.tolist() for lvl in levels] == path


@pytest.mark.parametrize('rows,cols,g,dead,samples', [
    (24, 64, 1, (), 200),
    (17, 90, 3, (), 200),
    (16, 96, 8, (), 300),
    (20, 48, 1, (0, 5, 6, 40), 30),  # singular: dead inputs and fewer samples than columns
    (12, 64, 4, (1, 2, 3, 17, 60), 20),  # dead inputs inside heads, rank-deficient X
])
@pytest.mark.parametrize('candidates', [(1.25, 16), (0.0, 0), (0.5, 1)], ids=['cached', 'all-miss', 'some-miss'])
def test_fast_matches_naive(rows, cols, g, dead, samples, candidates, monkeypatch):
    # The fast solver caches Gram columns of likely picks per block; a miss takes the GEMV path.
    monkeypatch.setattr(obs_solver._LazyObs, 'CANDIDATE_FACTOR', candidates[0])
    monkeypatch.setattr(obs_solver._LazyObs, 'CANDIDATE_EXTRA', candidates[1])
    W, H = make_problem(rows, cols, samples=samples, dead=dead, seed=4)
    n = cols // g
    # Every level (a refresh after each step) and few levels (many lazy steps between refreshes).
    for keeps in (list(range(n, -1, -1)), [n, 3 * n // 4, n // 3, 1, 0]):
        naive = structured_obs_naive(W, H, g, keeps)
        for block_size in (1, 3, 128):  # refresh every step, often (with compaction), only at levels
            fast = structured_obs(W, H, g, keeps, block_size=block_size)
            for a, b in zip(fast, naive):
                assert a.keep == b.keep
                assert torch.equal(a.kept, b.kept), (block_size, a.keep)
                torch.testing.assert_close(a.weight, b.weight, rtol=1e-9, atol=1e-9)
                assert a.error == pytest.approx(b.error, rel=1e-9, abs=1e-12)
                assert torch.isfinite(a.weight).all()


def test_dead_inputs_are_removed_first_and_zeroed():
    dead = (2, 7, 9)
    W, H = make_problem(6, 12, dead=dead, seed=5)
    for solver in (structured_obs, structured_obs_naive):
        full, level = solver(W, H, 1, [12, 9])
        assert full.weight[:, list(dead)].abs().max() == 0  # no weight on inputs that are always zero
        assert sorted(set(range(12)) - set(level.kept.tolist())) == list(dead)
        assert level.error == 0.0


def test_exact_ties_break_to_lowest_index():
    W, H = make_problem(5, 10, seed=6)
    W[:, [6, 3]] = 0  # two structures with zero error (inputs alive): an exact tie
    for solver in (structured_obs, structured_obs_naive):
        (level,) = solver(W, H, 1, [9])
        assert 3 not in level.kept.tolist() and 6 in level.kept.tolist()


def test_keep_counts_order_duplicates_zero_and_full():
    W, H = make_problem(5, 24, dead=(4,), seed=7)
    g, n = 4, 6
    Hd, Wz = prepare_hessian(H), zero_dead(W, H)
    keeps = [3, 0, 5, 3, n, 1]
    for solver in (structured_obs, structured_obs_naive):
        levels = solver(W, H, g, keeps)
        assert [lvl.keep for lvl in levels] == keeps and all(isinstance(x, ObsLevel) for x in levels)
        assert all(len(lvl.kept) == lvl.keep for lvl in levels)
        assert torch.equal(levels[0].kept, levels[3].kept) and torch.equal(levels[0].weight, levels[3].weight)
        assert levels[0].weight.data_ptr() != levels[3].weight.data_ptr()  # duplicates are independent copies
        zero, full = levels[1], levels[4]
        assert zero.kept.numel() == 0 and zero.weight.shape == (5, 0)
        assert zero.error == pytest.approx(layer_loss(Wz, torch.zeros_like(Wz), Hd), rel=1e-10)
        assert full.kept.tolist() == list(range(n)) and full.error == 0.0
        torch.testing.assert_close(full.weight, Wz, rtol=0, atol=0)
        assert solver(W, H, g, []) == []
        (only_zero,) = solver(W, H, g, [0])
        assert only_zero.error == pytest.approx(zero.error, rel=1e-10)
    fast, naive = structured_obs(W, H, g, keeps), structured_obs_naive(W, H, g, keeps)
    assert [lvl.kept.tolist() for lvl in fast] == [lvl.kept.tolist() for lvl in naive]


def test_output_dtype_and_float32_compute():
    W, H = make_problem(8, 32, samples=200, seed=8)
    keeps = [32, 24, 16, 8, 0]
    ref = structured_obs(W, H, 1, keeps)
    W16 = W.to(torch.bfloat16)
    levels = structured_obs(W16, H.float(), 1, keeps)
    assert all(lvl.weight.dtype == torch.bfloat16 for lvl in levels)
    f32 = structured_obs(W.float(), H.float(), 1, keeps, compute_dtype=torch.float32)
    naive32 = structured_obs_naive(W.float(), H.float(), 1, keeps, compute_dtype=torch.float32)
    assert all(lvl.weight.dtype == torch.float32 for lvl in f32)
    assert [lvl.kept.tolist() for lvl in f32] == [lvl.kept.tolist() for lvl in naive32]
    assert [lvl.kept.tolist() for lvl in f32] == [lvl.kept.tolist() for lvl in ref]
    for a, b in zip(f32, ref):
        torch.testing.assert_close(a.weight.double(), b.weight, rtol=1e-3, atol=1e-4)


def test_prepare_hessian_dead_inputs_and_relative_dampening():
    H = torch.tensor([[4.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    Hd = prepare_hessian(H, dampening=0.1)
    assert Hd.dtype == torch.float64
    damp = 0.1 * (4.0 + 2.0 + 1.0) / 3  # the dead input's diagonal is set to 1 before averaging
    torch.testing.assert_close(Hd.diagonal(), torch.tensor([4 + damp, 2 + damp, 1 + damp], dtype=DT))
    assert Hd[0, 1] == 1.0 and H[2, 2] == 0  # the input is not modified
    assert prepare_hessian(H, 0.1, dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize('solver', SOLVERS)
def test_indefinite_hessian_raises(solver):
    H = torch.tensor([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=DT)  # eigenvalue -1
    with pytest.raises(ValueError, match='not positive definite.*dampening'):
        solver(torch.ones(4, 3, dtype=DT), H, 1, [2], dampening=0.0)


@pytest.mark.parametrize('solver', SOLVERS)
@pytest.mark.parametrize('args,match', [
    (((4, 6), (5, 5), 1, [2]), 'Shape mismatch'),
    (((4, 6), (6, 5), 1, [2]), 'square'),
    (((4, 10), (10, 10), 4, [1]), 'not divisible by group_size'),
    (((4, 8), (8, 8), 4, [3]), 'out of range'),
    (((4, 8), (8, 8), 2, [-1]), 'out of range'),
    (((4, 8), (8, 8), 0, [1]), 'group_size'),
    (((4, 8), (8, 8), 1, [1.5]), 'ints'),
    (((8,), (8, 8), 1, [1]), 'W must be'),
])
def test_bad_inputs_raise_value_error(solver, args, match):
    w_shape, h_shape, g, keeps = args
    with pytest.raises(ValueError, match=match):
        solver(torch.randn(*w_shape, dtype=DT), torch.eye(*h_shape, dtype=DT), g, keeps)


def test_negative_dampening_and_nan_raise():
    W, H = make_problem(4, 8)
    with pytest.raises(ValueError, match='dampening'):
        structured_obs(W, H, 1, [4], dampening=-0.1)
    H[0, 0] = float('nan')
    with pytest.raises(ValueError, match='NaN'):
        structured_obs(W, H, 1, [4])


def test_inputs_not_modified():
    W, H = make_problem(6, 12, dead=(1,), seed=9)
    W0, H0 = W.clone(), H.clone()
    for solver in (structured_obs, structured_obs_naive):
        solver(W, H, 2, [6, 3, 0])
        assert torch.equal(W, W0) and torch.equal(H, H0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_cuda_matches_cpu():
    W, H = make_problem(16, 64, samples=200, dead=(5,), seed=10)
    keeps = [64, 40, 17, 1, 0]
    cpu = structured_obs_naive(W, H, 1, keeps)
    gpu = structured_obs(W.cuda().float(), H.cuda(), 1, keeps)
    for a, b in zip(gpu, cpu):
        assert a.weight.device.type == 'cuda' and a.kept.device.type == 'cuda'
        assert a.kept.tolist() == b.kept.tolist()
        torch.testing.assert_close(a.weight.double().cpu(), b.weight, rtol=1e-5, atol=1e-5)
