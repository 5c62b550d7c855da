"""Block-by-block calibration equals hooks on a full forward; distributed reduction and solve sharding."""

import pytest
import torch

from darwinlm_foundry.obs.calibration import (CalibrationBatch, collect_hessians, iter_layer_hessians, solve_units,
                                          unit_output_weight)
from darwinlm_foundry.obs.solver import structured_obs
from darwinlm_foundry.structure.levels import LevelSpec
from darwinlm_foundry.structure.units import Unit
from tests.conftest import tiny_model


def _full_forward_hessians(model, batches):
    """Reference: hooks on o_proj / down_proj inputs during ordinary full forwards (non-padding tokens)."""
    sums, counts, handles, current = {}, {}, [], {}
    for i, layer in enumerate(model.model.layers):
        for kind, module in (('attn', layer.self_attn.o_proj), ('mlp', layer.mlp.down_proj)):
            unit = Unit(i, kind)

            def hook(mod, inputs, out, unit=unit):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
                if current.get('mask') is not None:
                    x = x[current['mask'].reshape(-1).bool()]
                sums[unit] = sums.get(unit, 0) + x.T @ x
                counts[unit] = counts.get(unit, 0) + x.shape[0]

            handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for b in batches:
            current['mask'] = b.get('attention_mask') if isinstance(b, dict) else None
            if isinstance(b, dict):
                model(input_ids=b['input_ids'], attention_mask=b.get('attention_mask'))
            else:
                model(input_ids=b)
    for h in handles:
        h.remove()
    return {u: (2 * sums[u] / counts[u], counts[u]) for u in sums}


@pytest.mark.parametrize('family,attn', [('llama_gqa', 'eager'), ('qwen2', 'sdpa'), ('llama_mha', 'sdpa')])
def test_block_by_block_equals_full_forward(family, attn):
    model = tiny_model(family, attn_implementation=attn)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 128, (2, 12), generator=g), torch.randint(0, 128, (3, 12), generator=g)]
    ref = _full_forward_hessians(model, batches)
    got = collect_hessians(model, batches)
    assert set(got) == set(ref)
    for unit, (H, n) in ref.items():
        assert got[unit].n_tokens == n == 5 * 12
        torch.testing.assert_close(got[unit].hessian.double(), H, rtol=1e-5, atol=1e-6)
        assert got[unit].hessian.dtype == torch.float32


def test_padding_tokens_are_excluded():
    model = tiny_model('llama_gqa', attn_implementation='eager')
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    batches = [{'input_ids': ids, 'attention_mask': mask, 'labels': ids}]
    ref = _full_forward_hessians(model, batches)
    got = collect_hessians(model, batches)
    for unit, (H, n) in ref.items():
        assert got[unit].n_tokens == n == 16
        torch.testing.assert_close(got[unit].hessian.double(), H, rtol=1e-5, atol=1e-6)


def test_units_filter_progress_and_removed_units():
    model = tiny_model('llama_gqa')
    batches = [torch.randint(0, 128, (1, 8))]
    model.model.layers[2].mlp.down_proj = None  # stand-in for a removed unit: must be skipped, not crash
    model.model.layers[2].mlp = None
    seen = []
    got = dict(iter_layer_hessians(model, batches, units=[Unit(1, 'mlp')], progress=lambda i, n: seen.append((i, n))))
    assert seen == [(0, 3), (1, 3)]  # layer 2 not needed, not run
    assert list(got[1]) == [Unit(1, 'mlp')] and got[0] == {}


def test_reduce_fn_sums_over_ranks():
    """Two 'ranks' with disjoint halves of the data + a summing reduce equal one process with all data."""
    model = tiny_model('mistral')
    g = torch.Generator().manual_seed(2)
    shares = [[torch.randint(0, 128, (2, 8), generator=g)], [torch.randint(0, 128, (1, 8), generator=g)]]
    local = [collect_hessians(model, s) for s in shares]
    raw = {}  # what each rank would contribute to the all-reduce, keyed by call order

    def fake_all_reduce_for(rank):
        calls = iter(range(10**6))

        def reduce(t):
            key = next(calls)
            raw.setdefault(key, {})[rank] = t.clone()
            return sum(raw[key].values()) if len(raw[key]) == 2 else t
        return reduce

    collect_hessians(model, shares[0], reduce_fn=fake_all_reduce_for(0))
    reduced = collect_hessians(model, shares[1], reduce_fn=fake_all_reduce_for(1))
    whole = collect_hessians(model, shares[0] + shares[1])
    for unit, stat in whole.items():
        assert reduced[unit].n_tokens == stat.n_tokens == 24
        torch.testing.assert_close(reduced[unit].hessian, stat.hessian, rtol=1e-5, atol=1e-6)
        assert local[1][unit].n_tokens == 8


def test_solve_units_shards_round_robin_and_matches_direct_solve():
    model = tiny_model('llama_gqa', hidden_size=64, intermediate_size=160, num_attention_heads=10, head_dim=8,
                       num_key_value_heads=2, num_hidden_layers=2)
    spec = LevelSpec.from_config(model.config, mlp_multiple=16)
    hessians = collect_hessians(model, [torch.randint(0, 128, (2, 16))])
    weights = {u: unit_output_weight(model, u) for u in hessians}
    shards = [solve_units(weights, hessians, spec, 0.01, rank=r, world_size=3) for r in range(3)]  # 4 units
    units = sorted(weights)
    for r, shard in enumerate(shards):
        assert sorted(shard) == units[r::3]
    merged = {u: v for s in shards for u, v in s.items()}
    assert sorted(merged) == units
    unit = Unit(1, 'mlp')
    direct = structured_obs(weights[unit], hessians[unit].hessian, 1, [spec.keep('mlp', l) for l in range(11)])
    for level, ref in enumerate(direct):
        assert torch.equal(merged[unit][level].kept, ref.kept)
        assert torch.equal(merged[unit][level].weight, ref.weight)
    assert merged[Unit(0, 'attn')][10].keep == 0 and merged[Unit(0, 'attn')][3].weight.shape == (64, 7 * 8)


def test_calibration_batch_of_rejects_garbage():
    with pytest.raises(ValueError, match='input_ids'):
        CalibrationBatch.of({'text': 'x'})


def _real_text_batches(n_seq=8, seq_len=64):
    """Llama-2-tokenised RedPajama C4 text, as the package ships it (``darwinlm_foundry/assets``)."""
    import gzip
    import json

    from conftest import ASSETS
    spm = pytest.importorskip('sentencepiece')
    tok_path = ASSETS / 'llama2_tokenizer' / 'tokenizer.model'
    text_path = ASSETS / 'text' / 'redpajama_c4-rp1.jsonl.gz'
    sp = spm.SentencePieceProcessor(model_file=str(tok_path))
    ids = []
    with gzip.open(text_path, 'rt', encoding='utf-8') as f:
        for line in f:
            ids += [1] + sp.encode(json.loads(line)['text'])
            if len(ids) >= n_seq * seq_len:
                break
    return torch.tensor(ids[:n_seq * seq_len]).view(n_seq, seq_len).split(2)


def test_obs_beats_magnitude_pruning_on_real_text_at_every_level():
    """||WX - W_hat X||^2 of OBS with compensation < magnitude pruning without, levels 1..9, every unit."""
    batches = _real_text_batches()
    model = tiny_model('llama_gqa', vocab_size=32000, hidden_size=64, intermediate_size=352,
                       num_attention_heads=10, num_key_value_heads=2, head_dim=8, num_hidden_layers=2)
    spec = LevelSpec.from_config(model.config)
    hessians = collect_hessians(model, batches)
    inputs = {}  # the real activations X entering each output matrix, for the error itself
    handles = []
    for unit in hessians:
        layer = model.model.layers[unit.layer]
        module = layer.self_attn.o_proj if unit.kind == 'attn' else layer.mlp.down_proj
        handles.append(module.register_forward_hook(
            lambda mod, i, o, u=unit: inputs.setdefault(u, []).append(i[0].reshape(-1, i[0].shape[-1]))))
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in handles:
        h.remove()
    weights = {u: unit_output_weight(model, u) for u in hessians}
    solved = solve_units(weights, hessians, spec, 0.01)
    for unit, W in weights.items():
        X = torch.cat(inputs[unit]).double()
        W = W.double()
        g = spec.structure_size(unit.kind)
        norms = W.view(W.shape[0], -1, g).pow(2).sum(dim=(0, 2))
        def cols(idx):
            return (idx[:, None] * g + torch.arange(g)).reshape(-1)

        for level in range(1, 10):
            keep = spec.keep(unit.kind, level)
            obs = torch.zeros_like(W)
            obs[:, cols(solved[unit][level].kept)] = solved[unit][level].weight.double()
            mag = torch.zeros_like(W)
            top = norms.topk(keep).indices.sort().values
            mag[:, cols(top)] = W[:, cols(top)]
            err_obs = ((W - obs) @ X.T).pow(2).sum().item()
            err_mag = ((W - mag) @ X.T).pow(2).sum().item()
            assert err_obs < err_mag, (unit, level, err_obs, err_mag)
