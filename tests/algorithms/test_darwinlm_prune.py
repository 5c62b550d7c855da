"""The DarwinLMPrune Composer algorithm: builds the database at INIT, swaps in the shrunk model, trains it."""

import pytest
import torch
from conftest import tiny_model

from darwinlm_foundry.obs.database import SparsityDatabase, dense_tensor_getter
from darwinlm_foundry.structure.levels import LevelSpec


@pytest.fixture(scope='module')
def composer_setup(llama2_tokenizer):
    from composer.models import HuggingFaceModel
    from composer.utils import dist
    dist.initialize_dist('cpu')

    def make():
        hf = tiny_model('llama_gqa', vocab_size=32000, hidden_size=32, head_dim=4, intermediate_size=80,
                        num_attention_heads=10,
                        num_hidden_layers=2, attn_implementation='sdpa')
        return HuggingFaceModel(hf, tokenizer=llama2_tokenizer, use_logits=True, shift_labels=True)
    return make


def batches_of(shards, n=4):
    from darwinlm_foundry.data.loaders import sample_sequences
    ids = sample_sequences(shards / 'train', 2 * n, 64, seed=1)
    return [{'input_ids': ids[i:i + 2], 'labels': ids[i:i + 2]} for i in range(0, 2 * n, 2)]


def test_prune_at_init_then_train(tmp_path, wiki_shards, composer_setup):
    from composer import Trainer

    from darwinlm_foundry.algorithms.darwinlm_prune import DarwinLMPrune
    model = composer_setup()
    dense = model.model
    dense_state = {k: v.clone() for k, v in dense.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    algo = DarwinLMPrune(database=str(tmp_path / 'db'), levels=5,
                         calibration={'shards': str(wiki_shards), 'num_sequences': 16, 'seq_len': 64,
                                      'batch_size': 4, 'mlp_multiple': 8})
    trainer = Trainer(model=model, train_dataloader=batches_of(wiki_shards), max_duration='2ba',
                      device_train_microbatch_size=2, optimizers=opt, algorithms=[algo], device='cpu',
                      progress_bar=False, log_to_console=False, loggers=[])
    shrunk = model.model
    assert type(shrunk).__name__ == 'DarwinLMForCausalLM'
    spec = LevelSpec.from_config(dense.config, mlp_multiple=8)
    n = sum(p.numel() for p in shrunk.parameters())
    assert n == spec.parameter_count({'attn': [5, 5], 'mlp': [5, 5]}) < sum(v.numel() for v in dense_state.values())
    # The optimizer holds exactly the shrunk model's parameters.
    opt_ids = {id(p) for g in opt.param_groups for p in g['params']}
    assert opt_ids == {id(p) for p in shrunk.parameters()}
    # It is the database's stitch of the dense weights.
    db = SparsityDatabase.open(tmp_path / 'db', dense)
    again = db.stitch(5, dense_tensor_getter(dense))
    ids = torch.randint(0, 32000, (1, 16))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, shrunk.eval()(ids).logits)
    before = {k: v.clone() for k, v in shrunk.state_dict().items()}
    trainer.fit()
    assert any(not torch.equal(before[k], v) for k, v in shrunk.state_dict().items())
    assert model.model is shrunk


def test_prune_from_config_file_and_bad_keys(tmp_path, wiki_shards, composer_setup):
    from composer import Trainer

    from darwinlm_foundry.algorithms.darwinlm_prune import DarwinLMPrune
    with pytest.raises(ValueError, match=r"num_seqs: unknown key"):
        DarwinLMPrune(database='x', calibration={'shards': 'y', 'num_seqs': 3})
    model = composer_setup()
    with pytest.raises(ValueError, match='give a `calibration` section'):
        Trainer(model=model, algorithms=[DarwinLMPrune(database=str(tmp_path / 'none'))], device='cpu',
                progress_bar=False, log_to_console=False, loggers=[])
    cfg = tmp_path / 'levels.txt'
    cfg.write_text('model.layers.0.mlp.down_proj: 10\nmodel.layers.1.mlp.down_proj: 0\n'
                   'model.layers.0.self_attn.o_proj: 2\nmodel.layers.1.self_attn.o_proj: 8')
    algo = DarwinLMPrune(database=str(tmp_path / 'db'), levels=str(cfg),
                         calibration={'shards': str(wiki_shards), 'num_sequences': 8, 'seq_len': 64,
                                      'mlp_multiple': 8})
    Trainer(model=model, algorithms=[algo], device='cpu', progress_bar=False, log_to_console=False, loggers=[])
    shrunk = model.model
    assert shrunk.model.layers[0].mlp is None
    assert shrunk.config.layer_intermediate_sizes[1] == 80
    assert len(shrunk.config.layer_heads[1]) == 2 and len(shrunk.config.layer_heads[0]) == 8


def test_apply_on_a_bare_hf_model_equals_the_algorithm(tmp_path, wiki_shards, composer_setup):
    """apply_darwinlm_prune needs no Composer State: on a bare HF model (from a database directory, from an
    opened database, from a winner file) it returns the same shrunk model, logits and all, as the Algorithm
    run at INIT by a Trainer, and leaves the dense model as it was."""
    import copy
    import json

    from composer import Trainer

    from darwinlm_foundry.algorithms.darwinlm_prune import DarwinLMPrune, apply_darwinlm_prune
    model = composer_setup()
    bare = copy.deepcopy(model.model)
    levels = {'attn': [3, 7], 'mlp': [6, 2]}
    calibration = {'shards': str(wiki_shards), 'num_sequences': 8, 'seq_len': 64, 'mlp_multiple': 8}
    Trainer(model=model, algorithms=[DarwinLMPrune(database=str(tmp_path / 'db'), levels=levels,
                                                   calibration=calibration)],
            device='cpu', progress_bar=False, log_to_console=False, loggers=[])
    by_algorithm = model.model.eval()
    dense_state = {k: v.clone() for k, v in bare.state_dict().items()}
    winner = tmp_path / 'winner.json'
    winner.write_text(json.dumps({'levels': levels, 'fitness': 0.1}))
    db = SparsityDatabase.open(tmp_path / 'db', bare)
    ids = torch.randint(0, 32000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = by_algorithm(ids).logits
        for database, lv in ((str(tmp_path / 'db'), levels), (db, str(winner))):
            shrunk = apply_darwinlm_prune(bare, database, levels=lv)
            assert type(shrunk).__name__ == 'DarwinLMForCausalLM' and shrunk.config.levels == levels
            assert torch.equal(shrunk.eval()(ids).logits, want)
        stitched = db.stitch(levels, dense_tensor_getter(bare))
        assert torch.equal(stitched(ids).logits, want)
    assert all(torch.equal(v, dense_state[k]) for k, v in bare.state_dict().items())
    assert sum(p.numel() for p in shrunk.parameters()) == db.level_spec.parameter_count(levels)


def test_registered_for_foundry_yaml(tmp_path):
    """`algorithms: {darwinlm_prune: {...}}` and `callbacks: {darwinlm_search: {...}}` resolve through foundry."""
    from llmfoundry import registry
    from llmfoundry.utils.builders import build_algorithm

    from darwinlm_foundry.algorithms.darwinlm_prune import DarwinLMPrune
    from darwinlm_foundry.callbacks.evolutionary_search import DarwinLMSearch
    assert registry.algorithms.get('darwinlm_prune') is DarwinLMPrune
    assert registry.callbacks.get('darwinlm_search') is DarwinLMSearch
    algo = build_algorithm('darwinlm_prune', {'database': str(tmp_path / 'db'), 'levels': 6})
    assert isinstance(algo, DarwinLMPrune) and algo.config.levels == 6


@pytest.mark.slow(seconds=40)
def test_database_under_composer_launcher_matches_one_process(tmp_path, wiki_shards, llama2_tokenizer):
    """`composer -n 2` (gloo): calibration split over ranks, Hessians summed, solves spread, rank 0 writes.

    Same kept structures at every level as one process; compensated weights equal to fp32 rounding of the
    Hessian sums (rtol 1e-4, atol 1e-5).
    """
    import os
    import shutil
    import subprocess
    import sys

    from conftest import REPO
    from conftest import assert_same_database

    from darwinlm_foundry.algorithms.darwinlm_prune import CalibrationConfig, build_or_open_database
    model = tiny_model('llama_gqa', vocab_size=32000, hidden_size=32, head_dim=4, intermediate_size=80,
                       num_attention_heads=10, num_hidden_layers=2)
    model.save_pretrained(tmp_path / 'dense')
    composer = shutil.which('composer', path=os.path.dirname(sys.executable))
    out = subprocess.run([composer, '-n', '2', str(REPO / 'tests' / 'obs' / '_database_dist.py'), str(tmp_path / 'dense'),
                          str(wiki_shards), str(tmp_path / 'db2')], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    one = build_or_open_database(model, str(tmp_path / 'db1'),
                                 CalibrationConfig(shards=str(wiki_shards), num_sequences=16, seq_len=64,
                                                   batch_size=4, mlp_multiple=8))
    two = SparsityDatabase.open(tmp_path / 'db2', model)
    assert one.manifest['calibration']['sequences'] == two.manifest['calibration']['sequences'] == 16
    assert_same_database(two, one)
