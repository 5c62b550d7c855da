"""Physical shrinking equals zeroing the same structures in the dense model, for every family."""

import random

import pytest
import torch
import transformers
from conftest import tiny_model

from darwinlm_foundry.structure.families import UnsupportedModelError
from darwinlm_foundry.structure.shrinking import mask_model, parameter_count, shrink_model
from darwinlm_foundry.structure.units import Unit, head_dim, prunable_units


def random_kept(model, seed, removed=()):
    """Random kept sets for every unit: some partial, some untouched, ``removed`` units emptied."""
    rng = random.Random(seed)
    kept = {}
    for shape in prunable_units(model):
        if shape.unit in removed:
            kept[shape.unit] = []
        elif rng.random() < 0.8:
            n = rng.randint(1, shape.num_structures)
            kept[shape.unit] = rng.sample(range(shape.num_structures), n)
    return kept


def random_output_weights(model, kept, seed):
    gen = torch.Generator().manual_seed(seed)
    hd = head_dim(model.config)
    out = {}
    for unit, idx in kept.items():
        cols = len(idx) * (hd if unit.kind == 'attn' else 1)
        out[unit] = torch.randn(model.config.hidden_size, cols, generator=gen) * 0.05
    return out


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


REMOVED = (Unit(0, 'attn'), Unit(1, 'mlp'), Unit(2, 'attn'))


@pytest.mark.parametrize('attn_implementation', ['eager', 'sdpa'])
@pytest.mark.parametrize('compensate', [False, True])
def test_shrunk_equals_masked(family, attn_implementation, compensate):
    model = tiny_model(family, attn_implementation=attn_implementation)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    for seed in range(3):
        kept = random_kept(model, seed, removed=REMOVED if seed == 2 else ())
        weights = random_output_weights(model, kept, seed) if compensate else None
        shrunk, masked = shrink_model(model, kept, weights), mask_model(model, kept, weights)
        ref = logits(masked, ids)
        assert (logits(shrunk, ids) - ref).abs().max().item() <= 1e-5
        # The shrunk model really is smaller wherever something was pruned.
        n_shrunk = sum(p.numel() for p in shrunk.parameters())
        n_dense = sum(p.numel() for p in model.parameters())
        assert n_shrunk < n_dense
        # KV cache: prefix then continuation equals the full pass.
        with torch.no_grad():
            past = shrunk(ids[:, :7], use_cache=True).past_key_values
            cont = shrunk(ids[:, 7:], past_key_values=past).logits
        assert (cont - ref[:, 7:]).abs().max().item() <= 1e-5


def test_shrunk_model_owns_its_memory(family):
    """No tensor of the shrunk model shares storage with the source model or the given output weights (kept
    units, untouched units and replacements alike), so the source can change or be unmapped afterwards."""
    model = tiny_model(family)
    kept = random_kept(model, 3, removed=REMOVED)
    weights = random_output_weights(model, {u: k for u, k in kept.items() if u.layer % 2}, 3)
    shrunk = shrink_model(model, kept, weights)
    source = {t.untyped_storage().data_ptr() for t in [*model.state_dict().values(), *weights.values()]}
    for name, tensor in shrunk.state_dict().items():
        assert tensor.untyped_storage().data_ptr() not in source, name
    before = logits(shrunk, torch.arange(8)[None])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        for w in weights.values():
            w.add_(1.0)
    assert torch.equal(logits(shrunk, torch.arange(8)[None]), before)


def test_generate_matches_masked(family):
    model = tiny_model(family)
    kept = random_kept(model, 5, removed=REMOVED)
    shrunk, masked = shrink_model(model, kept), mask_model(model, kept)
    prompt = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    assert torch.equal(shrunk.generate(prompt, **kwargs), masked.generate(prompt, **kwargs))
    assert torch.equal(shrunk.generate(prompt, use_cache=False, **kwargs), masked.generate(prompt, **kwargs))


def test_padded_batch_matches_masked():
    model = tiny_model('llama_gqa', attn_implementation='sdpa')
    kept = random_kept(model, 3, removed=(Unit(0, 'attn'),))
    shrunk, masked = shrink_model(model, kept), mask_model(model, kept)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    with torch.no_grad():
        a = shrunk(ids, attention_mask=mask).logits[0, 4:]
        b = masked(ids, attention_mask=mask).logits[0, 4:]
    assert (a - b).abs().max().item() <= 1e-5


def test_bf16_runs_and_tracks_masked():
    model = tiny_model('qwen2', dtype=torch.bfloat16, attn_implementation='sdpa')
    kept = random_kept(model, 7)
    shrunk = shrink_model(model, kept)
    assert all(p.dtype == torch.bfloat16 for p in shrunk.parameters())
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(4))
    a, b = logits(shrunk, ids).float(), logits(mask_model(model, kept), ids).float()
    assert (a - b).abs().max().item() < 0.1 * b.abs().max().item()


def test_shrinking_twice_composes():
    model = tiny_model('llama_mha')
    first = {Unit(0, 'attn'): [0, 2, 3], Unit(1, 'mlp'): list(range(10, 90))}
    second = {Unit(0, 'attn'): [0, 2], Unit(1, 'mlp'): list(range(0, 80, 2))}
    twice = shrink_model(shrink_model(model, first), second)
    once = shrink_model(model, {Unit(0, 'attn'): [0, 3], Unit(1, 'mlp'): list(range(10, 90, 2))})
    assert twice.config.layer_heads == once.config.layer_heads == [[0, 3], [0, 1, 2, 3], [0, 1, 2, 3]]
    ids = torch.randint(0, 128, (1, 6))
    assert torch.equal(logits(twice, ids), logits(once, ids))


def closed_form_count(config, kept):
    """Parameter count written out from the kept sets alone (independent of the library's formula)."""
    h, hd, v = config.hidden_size, head_dim(config), config.vocab_size
    nq, nkv, inter = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    qkv_b = int(getattr(config, 'attention_bias', False) or config.model_type == 'qwen2')
    o_b = int(getattr(config, 'attention_bias', False))
    mlp_b = int(getattr(config, 'mlp_bias', False))
    total = 2 * v * h + h
    for layer in range(config.num_hidden_layers):
        heads = len(kept.get(Unit(layer, 'attn'), range(nq)))
        cols = len(kept.get(Unit(layer, 'mlp'), range(inter)))
        kv = nkv if nkv != nq else heads
        if heads:
            total += h + heads * hd * (h + qkv_b) + 2 * kv * hd * (h + qkv_b) + heads * hd * h + o_b * h
        if cols:
            total += h + 2 * cols * (h + mlp_b) + cols * h + mlp_b * h
    return total


def test_parameter_count_closed_form(family):
    model = tiny_model(family)
    assert sum(p.numel() for p in model.parameters()) == parameter_count(model.config)
    for seed in range(4):
        kept = random_kept(model, seed, removed=REMOVED if seed % 2 else ())
        shrunk = shrink_model(model, kept)
        n = sum(p.numel() for p in shrunk.parameters())
        assert n == parameter_count(shrunk.config) == closed_form_count(model.config, kept)


def test_bad_input_is_named():
    model = tiny_model('llama_gqa')
    with pytest.raises(ValueError, match='out of range'):
        shrink_model(model, {Unit(0, 'attn'): [0, 4]})
    with pytest.raises(ValueError, match='duplicated'):
        shrink_model(model, {Unit(0, 'mlp'): [1, 1, 2]})
    with pytest.raises(ValueError, match='grouped-query attention K/V stay whole'):
        shrink_model(model, {Unit(0, 'kv'): [0]})
    with pytest.raises(ValueError, match='does not exist'):
        shrink_model(model, {Unit(7, 'mlp'): [0]})
    with pytest.raises(ValueError, match='replacement output weight has shape'):
        shrink_model(model, {Unit(0, 'attn'): [0, 1]}, {Unit(0, 'attn'): torch.zeros(64, 16)})
    with pytest.raises(ValueError, match='no kept set'):
        shrink_model(model, {}, {Unit(0, 'mlp'): torch.zeros(64, 96)})
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="'gpt2' is not supported"):
        shrink_model(gpt2, {})
