"""Converter, shard checks, samplers, foundry loader and the tiny pretraining stage (darwinlm_foundry.data).

Real text: a subset of the RedPajama sample the package ships (``darwinlm_foundry/assets/text``). Token counts are re-derived here from the
source documents with an independent tokenisation, and shard contents are read back with
streaming's own ``StreamingDataset``.
"""

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import ASSETS

from darwinlm_foundry import data

SHARED = Path(__file__).resolve().parents[3] / 'shared' / 'data'
SAMPLE = SHARED / 'redpajama_sample'  # only to check that the shipped text is the shared sample
TEXT = ASSETS / 'text'  # the same RedPajama text, as the package ships it
SEQ = 64
SPLITS = ('calibration', 'search', 'train', 'heldout')


@pytest.fixture(scope='module')
def tok():
    return data.embedded_tokenizer()


@pytest.fixture(scope='module')
def subset(tmp_path_factory):
    """150 C4 documents + the 3 shortest Wikipedia documents (Cyrillic), as one JSONL file, plus their texts."""
    c4 = [json.loads(line) for line in gzip.open(TEXT / 'redpajama_c4-rp1.jsonl.gz', 'rt')][:150]
    wiki = sorted((json.loads(line) for line in gzip.open(TEXT / 'redpajama_wiki1.jsonl.gz', 'rt')),
                  key=lambda r: len(r['text']))[:3]
    path = tmp_path_factory.mktemp('src') / 'subset.jsonl'
    path.write_text(''.join(json.dumps(r) + '\n' for r in c4 + wiki))
    return path, [r['text'] for r in c4 + wiki]


def read_split(root, split):
    """All samples of a split, in order, read with streaming's StreamingDataset (not our reader)."""
    from streaming import StreamingDataset

    with data.serialized_shm_registration():  # test workers build datasets concurrently
        ds = StreamingDataset(local=str(root), split=split, shuffle=False, batch_size=1)
    return [np.asarray(ds[i]['tokens']) for i in range(ds.num_samples)]


def expected_tokens(tok, text):
    """Independent re-tokenisation: tokenizer default (BOS) + text + EOS, one document at a time."""
    return tuple(tok(text, verbose=False)['input_ids']) + (tok.eos_token_id,)


def recover_documents(stream, eos):
    """Split a token stream at EOS into complete documents plus the trailing partial one."""
    ends = np.flatnonzero(stream == eos)
    docs, start = [], 0
    for end in ends:
        docs.append(tuple(stream[start:end + 1].tolist()))
        start = end + 1
    return docs, tuple(stream[start:].tolist())


def check_conversion(root, manifest, tok, texts):
    """Exact token / document accounting of a conversion against an independent tokenisation."""
    by_tokens = {expected_tokens(tok, t): i for i, t in enumerate(texts)}
    assert len(by_tokens) == len(texts)  # every document tokenises uniquely, so recovery is unambiguous
    assert sum(len(k) for k in by_tokens) == sum(e['doc_tokens'] for e in manifest['split_counts'].values())
    assert sum(e['docs'] for e in manifest['split_counts'].values()) == len(texts) == manifest['documents']['kept']
    owner, recovered_tokens = {}, {}
    for split, entry in manifest['split_counts'].items():
        if not entry['written']:
            assert not (Path(root) / split).exists()
            continue
        samples = read_split(root, split)
        assert len(samples) == entry['samples'] == data.check_shards(root, split)['num_samples']
        assert all(s.shape == (SEQ,) and s.dtype == np.int32 for s in samples)
        assert entry['tokens'] == SEQ * len(samples)
        assert 0 <= entry['dropped_tokens'] == entry['doc_tokens'] - entry['tokens'] < SEQ
        docs, partial = recover_documents(np.concatenate(samples), tok.eos_token_id)
        for d in docs:
            assert d in by_tokens, 'a complete document in the shards is not a source document'
            assert by_tokens[d] not in owner, f'document {by_tokens[d]} appears in {owner.get(by_tokens[d])} and {split}'
            owner[by_tokens[d]] = split
        assert len(docs) <= entry['docs'] <= len(docs) + 1 + entry['dropped_tokens'] // 2
        if partial:
            assert any(k[:len(partial)] == partial for k in by_tokens)
        recovered_tokens[split] = sum(map(len, docs))
    # every token is accounted for: what is not in a complete recovered document (partial tails and
    # documents lost in the dropped remainders) is exactly the documents no split shows complete
    unrecovered = sum(len(k) for k, i in by_tokens.items() if i not in owner)
    assert unrecovered == sum(e['doc_tokens'] - recovered_tokens.get(s, 0) for s, e in manifest['split_counts'].items())
    return owner


def test_converter_fractions_exact_and_disjoint(tmp_path, tok, subset):
    path, texts = subset
    out = tmp_path / 'mds'
    m = data.convert_to_mds(path, out, tok, seq_len=SEQ, splits={'calibration': 0.1, 'search': 0.1, 'train': 0.6,
                                                                  'heldout': 0.2})
    assert json.loads((out / 'manifest.json').read_text()) == m
    assert m['seq_len'] == SEQ and m['seed'] == 0 and m['tokenizer']['vocab_size'] == 32000
    assert m['sources'] == [{'path': str(path), 'bytes': path.stat().st_size,
                             'sha256': hashlib.sha256(path.read_bytes()).hexdigest()}]
    assert m['documents'] == {'read': len(texts), 'filtered_out': 0, 'empty': 0, 'unassigned': 0, 'kept': len(texts)}
    owner = check_conversion(out, m, tok, texts)
    assert set(owner.values()) == set(SPLITS)
    assert not [p for p in out.iterdir() if p.name.startswith('.')]  # no staging left behind
    # same call again: reused, not rewritten; another seed moves documents between splits
    assert data.convert_to_mds(path, out, tok, seq_len=SEQ, splits=m['splits']) == m
    with pytest.raises(FileExistsError, match='overwrite=True'):
        data.convert_to_mds(path, out, tok, seq_len=SEQ, splits=m['splits'], seed=1)
    m1 = data.convert_to_mds(path, out, tok, seq_len=SEQ, splits=m['splits'], seed=1, overwrite=True)
    owner1 = check_conversion(out, m1, tok, texts)
    assert owner1 != owner
    # the same bytes copied elsewhere (new path, new mtime) reuse the conversion; other bytes do not
    copy = tmp_path / 'elsewhere' / path.name
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    assert data.convert_to_mds(copy, out, tok, seq_len=SEQ, splits=m['splits'], seed=1)['fingerprint'] == m1['fingerprint']
    copy.write_bytes(path.read_bytes().replace(b'the', b'teh', 1))
    with pytest.raises(FileExistsError, match='overwrite=True'):
        data.convert_to_mds(copy, out, tok, seq_len=SEQ, splits=m['splits'], seed=1)


def test_converter_doc_counts_and_gzip(tmp_path, tok, subset):
    path, texts = subset
    gz = tmp_path / 'src' / 'subset.jsonl.gz'
    gz.parent.mkdir()
    gz.write_bytes(gzip.compress(path.read_bytes()))
    m = data.convert_to_mds(tmp_path / 'src', tmp_path / 'mds', tok, seq_len=SEQ,
                            splits={'calibration': 5, 'search': 7, 'heldout': 0.1, 'train': None})
    counts = {k: v['docs'] for k, v in m['split_counts'].items()}
    assert counts == {'calibration': 5, 'search': 7, 'heldout': round(0.1 * len(texts)),
                      'train': len(texts) - 12 - round(0.1 * len(texts))}
    check_conversion(tmp_path / 'mds', m, tok, texts)


def write_scored(path, n=24):
    """Synthetic FineWeb-Edu-like records: unique markers, alternating high / low quality scores."""
    rows = []
    for i in range(n):
        low = i % 3 == 0
        marker = f'QQZLOWDOC{i}' if low else f'KEEPDOC{i}'
        text = f'{marker} ' + ' '.join(f'the {marker.lower()} lesson {j} explains photosynthesis.' for j in range(12))
        rows.append({'text': text, 'score': 1.5 if low else 3.2, 'int_score': 1 if low else 3, 'id': str(i)})
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    return rows


def all_decoded(tok, root, manifest):
    return ''.join(tok.decode(np.concatenate(read_split(root, s)).tolist())
                   for s, e in manifest['split_counts'].items() if e['written'])


def test_score_filter_removes_documents(tmp_path, tok):
    rows = write_scored(tmp_path / 'edu.jsonl')
    n_low = sum(r['score'] < 3 for r in rows)
    m = data.convert_to_mds(tmp_path / 'edu.jsonl', tmp_path / 'mds', tok, seq_len=SEQ, min_score=3.0,
                            splits={'calibration': 0.2, 'train': 0.6, 'heldout': 0.2})
    assert m['documents']['filtered_out'] == n_low and m['documents']['kept'] == len(rows) - n_low
    text = all_decoded(tok, tmp_path / 'mds', m)
    assert 'QQZLOWDOC' not in text
    assert 'KEEPDOC' in text
    check_conversion(tmp_path / 'mds', m, tok, [r['text'] for r in rows if r['score'] >= 3])
    # without a threshold every document is kept (the low ones appear)
    m_all = data.convert_to_mds(tmp_path / 'edu.jsonl', tmp_path / 'all', tok, seq_len=SEQ,
                                splits={'calibration': 0.2, 'train': 0.6, 'heldout': 0.2})
    assert m_all['documents']['filtered_out'] == 0
    assert 'QQZLOWDOC' in all_decoded(tok, tmp_path / 'all', m_all)


def test_parquet_int_score_matches_jsonl(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = write_scored(tmp_path / 'edu.jsonl')
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / 'edu.parquet')
    kw = dict(seq_len=SEQ, score_key='int_score', min_score=3, splits={'train': 0.7, 'heldout': 0.3})
    mj = data.convert_to_mds(tmp_path / 'edu.jsonl', tmp_path / 'j', tok, **kw)
    mp = data.convert_to_mds(tmp_path / 'edu.parquet', tmp_path / 'p', tok, **kw)
    assert mj['split_counts'] == mp['split_counts'] and mj['documents'] == mp['documents']
    for split in ('train', 'heldout'):
        assert all((a == b).all() for a, b in zip(read_split(tmp_path / 'j', split), read_split(tmp_path / 'p', split)))


def test_missing_score_field_is_a_clear_error(tmp_path, tok):
    (tmp_path / 'rp.jsonl').write_text(json.dumps({'text': 'no score here ' * 50}) + '\n')
    with pytest.raises(KeyError, match="'score'.*score_key"):
        data.convert_to_mds(tmp_path / 'rp.jsonl', tmp_path / 'out', tok, seq_len=SEQ, min_score=3.0)
    with pytest.raises(KeyError, match="'body'"):
        data.convert_to_mds(tmp_path / 'rp.jsonl', tmp_path / 'out', tok, seq_len=SEQ, text_key='body')
    assert not (tmp_path / 'out' / 'manifest.json').exists()


def test_fsspec_source_and_bad_scheme(tmp_path, tok, subset):
    """URI sources go through fsspec (here its in-memory filesystem stands in for s3:// / hf://)."""
    import fsspec

    path, texts = subset
    fs = fsspec.filesystem('memory')
    fs.pipe('/darwinlm-test/edu/part-0.jsonl', path.read_bytes())
    try:
        m = data.convert_to_mds('memory://darwinlm-test/edu', tmp_path / 'mds', tok, seq_len=SEQ,
                                splits={'train': 0.8, 'heldout': 0.2})
    finally:
        fs.rm('/darwinlm-test', recursive=True)
    assert [s['bytes'] for s in m['sources']] == [path.stat().st_size]
    check_conversion(tmp_path / 'mds', m, tok, texts)
    with pytest.raises(RuntimeError, match='cannot open remote source'):
        data.convert_to_mds('nosuchscheme://bucket/x.jsonl', tmp_path / 'out', tok, seq_len=SEQ)
    assert not (tmp_path / 'out').exists()


def test_errors_before_compute(tmp_path, tok, subset):
    path, _ = subset
    with pytest.raises(FileNotFoundError, match='does not exist'):
        data.convert_to_mds(tmp_path / 'nope.jsonl', tmp_path / 'out', tok, seq_len=SEQ)
    assert not (tmp_path / 'out').exists()
    with pytest.raises(ValueError, match='sum to'):
        data.convert_to_mds(path, tmp_path / 'out', tok, seq_len=SEQ, splits={'train': 0.8, 'heldout': 0.3})
    (tmp_path / 'short.jsonl').write_text(''.join(json.dumps({'text': f'short text {i}'}) + '\n' for i in range(3)))
    with pytest.raises(ValueError, match="split 'heldout' got 1 documents.*fewer than seq_len"):
        data.convert_to_mds(tmp_path / 'short.jsonl', tmp_path / 'out', tok, seq_len=8,
                            splits={'train': None, 'heldout': 1})
    assert not (tmp_path / 'out' / 'manifest.json').exists()
    with pytest.raises(FileNotFoundError, match='does not exist'):
        data.check_shards(tmp_path / 'missing', 'train')
    with pytest.raises(ValueError, match="unsupported URI scheme 'ftp'"):
        data.check_shards('ftp://host/data', 'train')
    with pytest.raises(FileNotFoundError, match='does not exist'):
        data.build_text_loader(data.text_dataloader_cfg(tmp_path / 'missing', 'train', SEQ), tok, 2)

    root = tmp_path / 'mds'
    data.convert_to_mds(path, root, tok, seq_len=SEQ, splits={'train': 0.9, 'heldout': 0.1})
    info = data.check_shards(root, 'train', seq_len=SEQ)
    assert info['seq_len'] == SEQ and info['num_samples'] > 0 and info['columns'] == ['tokens']
    with pytest.raises(ValueError, match='reconvert'):
        data.check_shards(root, 'train', seq_len=2 * SEQ)
    with pytest.raises(FileNotFoundError, match='does not exist'):
        data.check_shards(root, 'search')  # a split that was never written
    index = json.loads((root / 'heldout' / 'index.json').read_text())
    shard = root / 'heldout' / index['shards'][0]['raw_data']['basename']
    shard.write_bytes(shard.read_bytes()[:-7])  # truncated (an interrupted copy)
    with pytest.raises(ValueError, match='truncated or overwritten'):
        data.check_shards(root, 'heldout')
    shard.unlink()
    with pytest.raises(FileNotFoundError, match='missing'):
        data.check_shards(root, 'heldout')
    (root / 'heldout' / 'index.json').write_text(json.dumps({'version': 2, 'shards': []}))
    with pytest.raises(ValueError, match='empty'):
        data.check_shards(root, 'heldout')
    (root / 'heldout' / 'index.json').unlink()
    with pytest.raises(FileNotFoundError, match='index.json'):
        data.check_shards(root, 'heldout')
    with pytest.raises(ValueError, match='local'):
        data.sample_sequences('s3://bucket/mds/train', 2, SEQ)


def test_sampler_deterministic_and_compressed(tmp_path, tok, subset):
    path, _ = subset
    kw = dict(seq_len=SEQ, splits={'train': 0.8, 'heldout': 0.2})
    data.convert_to_mds(path, tmp_path / 'raw', tok, **kw)
    data.convert_to_mds(path, tmp_path / 'zst', tok, compression='zstd', **kw)
    assert not list((tmp_path / 'zst' / 'train').glob('*.mds'))  # only compressed shards were written
    stored = {tuple(s.tolist()) for s in read_split(tmp_path / 'raw', 'train')}
    a = data.sample_sequences(tmp_path / 'raw' / 'train', 8, SEQ, seed=3)
    assert a.shape == (8, SEQ) and str(a.dtype) == 'torch.int64'
    assert all(tuple(r.tolist()) in stored for r in a)
    assert len({tuple(r.tolist()) for r in a}) == 8  # without replacement
    assert (a == data.sample_sequences(tmp_path / 'raw' / 'train', 8, SEQ, seed=3)).all()
    assert not (a == data.sample_sequences(tmp_path / 'raw' / 'train', 8, SEQ, seed=4)).all()
    assert (a == data.sample_sequences(tmp_path / 'zst' / 'train', 8, SEQ, seed=3)).all()
    short = data.sample_sequences(tmp_path / 'raw' / 'train', 8, 16, seed=3)
    assert (short == a[:, :16]).all()
    with pytest.raises(ValueError, match='asked for'):
        data.sample_sequences(tmp_path / 'raw' / 'train', 10**6, SEQ)


def test_embedded_assets_are_the_shared_data():
    files = data.embedded_text_files()
    tok_model = data.embedded_tokenizer_dir() / 'tokenizer.model'
    total = sum(f.stat().st_size for f in files) + tok_model.stat().st_size
    assert 1e6 < total <= 4 * 2**20
    assert tok_model.read_bytes() == (SHARED / 'llama2_tokenizer' / 'tokenizer.model').read_bytes()
    shared_lines = {line for f in SAMPLE.glob('*.jsonl') for line in f.read_text().splitlines()}
    embedded_lines = [line for f in files for line in gzip.decompress(f.read_bytes()).decode().splitlines()]
    assert embedded_lines and set(embedded_lines) <= shared_lines
    assert all('text' in json.loads(line) for line in embedded_lines)


def test_embedded_tokenizer_offline(tok):
    assert type(tok).__name__ == 'LlamaTokenizerFast' and len(tok) == 32000
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    assert tok('Hello world')['input_ids'] == [1, 15043, 3186]  # Llama-2's ids


def test_foundry_text_loader_reads_the_split(tmp_path, tok, subset):
    """The one test that imports llm-foundry: its builder consumes text_dataloader_cfg's dict."""
    path, _ = subset
    root = tmp_path / 'mds'
    data.convert_to_mds(path, root, tok, seq_len=SEQ, splits={'train': 0.8, 'heldout': 0.2})
    cfg = data.text_dataloader_cfg(root, 'train', SEQ, shuffle=True, shuffle_seed=1)
    assert cfg['name'] == 'text' and cfg['dataset']['local'] == str(root.resolve())
    assert cfg['dataset']['remote'] is None and cfg['dataset']['max_seq_len'] == SEQ
    remote = data.text_dataloader_cfg('s3://bucket/mds', 'train', SEQ)['dataset']
    assert remote['remote'] == 's3://bucket/mds' and remote['local'] != remote['remote']
    spec = data.build_text_loader(cfg, tok, 4)
    batch = next(iter(spec.dataloader))
    assert batch['input_ids'].shape == (4, SEQ) and batch['labels'].shape == (4, SEQ)
    stored = {tuple(s.tolist()) for s in read_split(root, 'train')}
    assert all(tuple(r.tolist()) in stored for r in batch['input_ids'])
    assert (batch['labels'] == batch['input_ids']).all()  # pad is <unk>, so EOS keeps its label
    data.stop_streaming(spec)


def test_pretrain_tiny_smoke_and_cache(tmp_path, tok):
    from darwinlm_foundry.data.demo_pretrain import PRETRAIN_RECORD, pretrain_tiny

    root = tmp_path / 'mds'
    data.convert_to_mds(TEXT / 'redpajama_wiki1.jsonl.gz', root, tok, seq_len=32, splits={'train': None, 'heldout': 3})
    kw = dict(shards_dir=root, hidden=32, layers=2, heads=2, kv_heads=1, steps=12, seq_len=32, batch_size=4,
              lr=1e-2, warmup=2, eval_every=6, eval_seqs=8)
    import sys
    import time

    def streaming_threads():  # thread ids of streaming's pollers alive now (earlier tests may own some)
        return {t for t, f in sys._current_frames().items()
                if f.f_code.co_name in ('_prepare_thread', '_ready_thread')}

    before = streaming_threads()
    r = pretrain_tiny(tmp_path / 'model', **kw)
    assert not r.cached and r.ppl_after < 0.8 * r.ppl_before
    # the fit stopped mid-epoch; its streaming download / ready threads must not keep polling afterwards
    time.sleep(0.5)
    assert not streaming_threads() - before
    assert [s for s, _ in r.curve] == [0, 6, 12] and len(r.train_loss) == 12
    assert np.mean(r.train_loss[-3:]) < np.mean(r.train_loss[:3])
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tmp_path / 'model')
    assert model.config.hidden_size == 32 and model.config.tie_word_embeddings
    assert AutoTokenizer.from_pretrained(tmp_path / 'model')('Hello')['input_ids'] == tok('Hello')['input_ids']
    mtime = (tmp_path / 'model' / PRETRAIN_RECORD).stat().st_mtime_ns
    again = pretrain_tiny(tmp_path / 'model', **kw)
    assert again.cached and again.ppl_after == r.ppl_after and again.curve == r.curve
    assert (tmp_path / 'model' / PRETRAIN_RECORD).stat().st_mtime_ns == mtime


@pytest.mark.parametrize('splits', [{'calibration': 0.2, 'heldout': 0.3, 'train': None},
                                    {'train': 60, 'heldout': 40, 'search': None}])
def test_split_texts_by_source_are_exactly_the_split_documents(tmp_path, tok, subset, splits):
    """Held-out text per domain: the same documents the converter put into the split, grouped by file."""
    _, texts = subset
    files = {'c4_part': texts[:150], 'wiki_part': texts[150:]}
    for name, part in files.items():
        (tmp_path / f'{name}.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in part))
    out = tmp_path / 'mds'
    m = data.convert_to_mds([tmp_path / f'{n}.jsonl' for n in files], out, tok, seq_len=SEQ, splits=splits,
                            score_key=None)
    owner = check_conversion(out, m, tok, texts)
    by_source = data.split_texts_by_source(out, 'heldout')
    assert set(by_source) <= set(files) and sum(map(len, by_source.values())) == m['split_counts']['heldout']['docs']
    for name, got in by_source.items():
        assert set(got) <= set(files[name])
    held = {t for got in by_source.values() for t in got}
    assert all((texts[i] in held) == (split == 'heldout') for i, split in owner.items())
    packed = data.pack_documents(tok, by_source['c4_part'], SEQ)
    assert packed.shape[1] == SEQ and packed[0, 0] == tok.bos_token_id


def test_segments_cut_at_breaks_and_lose_nothing():
    from darwinlm_foundry.data.sources import segments
    paragraphs = [f'Paragraph {i}. ' + 'word ' * (7 * i % 23 + 3) for i in range(60)]
    text = '\n\n'.join(paragraphs)
    for max_chars in (50, 120, 400, len(text)):
        pieces = segments(text, max_chars)
        assert ''.join(pieces) == text and all(0 < len(p) <= max_chars for p in pieces)
        if max_chars >= 400:  # every paragraph is shorter than half a piece: every cut is at a paragraph break
            assert all(p.endswith('\n\n') for p in pieces[:-1])
    assert segments(text, None) == [text]
    unbroken = 'x' * 1000
    assert segments(unbroken, 300) == ['x' * 300] * 3 + ['x' * 100]


def test_stratified_split_gives_every_source_its_share(tmp_path, tok, subset):
    """stratify + max_doc_chars: a source of two long documents and one of three short ones reach every split,
    each split holds about its fraction of every source's characters, the pieces are disjoint across splits,
    and split_texts_by_source reads back exactly the converter's pieces."""
    from darwinlm_foundry.data.sources import segments
    _, texts = subset
    book = '\n\n'.join(texts[:75]), '\n\n'.join(texts[75:150])  # two long "books" of C4 paragraphs
    sources = {'book': list(book), 'wiki': texts[150:]}
    for name, docs in sources.items():
        (tmp_path / f'{name}.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in docs))
    splits = {'calibration': 0.1, 'search': 0.1, 'heldout': 0.2, 'train': None}
    max_chars = 2000
    m = data.convert_to_mds([tmp_path / f'{n}.jsonl' for n in sources], tmp_path / 'mds', tok, seq_len=SEQ,
                            splits=splits, score_key=None, stratify=True, max_doc_chars=max_chars)
    assert m['stratify'] is True and m['max_doc_chars'] == max_chars
    pieces = {n: [p for t in docs for p in segments(t, max_chars)] for n, docs in sources.items()}
    check_conversion(tmp_path / 'mds', m, tok, [p for ps in pieces.values() for p in ps])
    read = {s: data.split_texts_by_source(tmp_path / 'mds', s) for s in splits}
    for name, ps in pieces.items():
        got = {s: read[s].get(name, []) for s in splits}
        assert sorted(p for g in got.values() for p in g) == sorted(ps)  # each piece in exactly one split
        assert {s: len(g) for s, g in got.items() if g} == m['source_docs'][name]
        total = sum(map(len, ps))
        for s, frac in {**splits, 'train': 0.6}.items():
            share = sum(map(len, got[s])) / total
            if name == 'book':  # many pieces: every split within two pieces of its fraction
                assert abs(share - frac) <= 2 * max_chars / total, (s, share)
    assert all(m['source_docs']['book'].get(s, 0) > 0 for s in splits)
    plain = data.convert_to_mds(tmp_path / 'book.jsonl', tmp_path / 'plain', tok, seq_len=SEQ, score_key=None)
    assert 'stratify' not in plain and 'max_doc_chars' not in plain  # old conversions keep their fingerprint
    with pytest.raises(ValueError, match='stratify splits each source by fractions'):
        data.convert_to_mds(tmp_path / 'book.jsonl', tmp_path / 'bad', tok, seq_len=SEQ, score_key=None,
                            splits={'train': 10, 'heldout': None}, stratify=True)
    assert not (tmp_path / 'bad').exists()  # rejected before anything is written


def test_source_rows_and_balanced_samples(tmp_path, tok, subset):
    """The manifest's per-source row ranges credit every row to the source of the document that completes it
    (checked against an independent tokenisation); ``by_source`` samples take the sources in rounds; a manifest
    from before the ranges existed is redone by the converter and refused by the sampler, naming the fix."""
    _, texts = subset
    files = {'c4_a': texts[:60], 'wiki': texts[150:], 'c4_b': texts[60:150]}  # a small source between two large
    for name, part in files.items():
        (tmp_path / f'{name}.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in part))
    out = tmp_path / 'mds'
    splits = {'search': 0.5, 'heldout': None}
    m = data.convert_to_mds([tmp_path / f'{n}.jsonl' for n in files], out, tok, seq_len=SEQ, splits=splits,
                            score_key=None, stratify=True)
    for split in splits:
        by_source = data.split_texts_by_source(out, split)
        # the split's token stream in file order; the source of the document holding each row's last token
        owner = [name for name in files for t in by_source.get(name, []) for _ in expected_tokens(tok, t)]
        n = m['split_counts'][split]['samples']
        want = [owner[(r + 1) * SEQ - 1] for r in range(n)]
        runs = m['source_rows'][split]
        assert runs[0][1] == 0 and runs[-1][2] == n and all(a[2] == b[1] for a, b in zip(runs, runs[1:]))
        assert [name for name, first, end in runs for _ in range(first, end)] == want
        assert [r[0] for r in runs] == [name for name in files if name in set(want)]  # file order, one run each
    rows = [tuple(r.tolist()) for r in read_split(out, 'search')]
    source_of = {row: name for name, first, end in m['source_rows']['search'] for row in rows[first:end]}
    assert len(source_of) == len(rows)  # rows are distinct, so a sampled row names its source
    sizes = {name: end - first for name, first, end in m['source_rows']['search']}
    assert min(sizes.values()) >= 2 and len(sizes) == 3

    def drawn(k, seed):
        got = data.sample_sequences(out / 'search', k, SEQ, seed=seed, by_source=True)
        return [source_of[tuple(r.tolist())] for r in got]

    for seed in range(5):
        assert sorted(drawn(3, seed)) == sorted(sizes)  # one of each
        assert all(drawn(6, seed).count(name) == 2 for name in sizes)  # two rounds: two of each
        assert sorted(drawn(2, seed)) == sorted(set(drawn(2, seed)))  # fewer than the sources: all different
    assert (data.sample_sequences(out / 'search', 6, SEQ, seed=1, by_source=True) ==
            data.sample_sequences(out / 'search', 6, SEQ, seed=1, by_source=True)).all()
    everything = data.sample_sequences(out / 'search', len(rows), SEQ, seed=2, by_source=True)
    assert sorted(tuple(r.tolist()) for r in everything) == sorted(rows)  # small sources run dry, then the rest

    manifest = out / 'manifest.json'
    old = json.loads(manifest.read_text())
    bad = json.loads(json.dumps(old))
    bad['source_rows']['search'][-1][2] -= 1  # a split and a manifest of different conversions
    manifest.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match='do not tile'):
        data.sample_sequences(out / 'search', 2, SEQ, by_source=True)
    del old['source_rows']  # as an older converter wrote it
    manifest.write_text(json.dumps(old))
    from darwinlm_foundry.search.tokens import ShardTokens
    with pytest.raises(ValueError, match='convert the text again'):
        ShardTokens(out / 'search', by_source=True)
    ShardTokens(out / 'search')  # proportional samples need no ranges
    again = data.convert_to_mds([tmp_path / f'{n}.jsonl' for n in files], out, tok, seq_len=SEQ, splits=splits,
                                score_key=None, stratify=True)
    assert again['source_rows'] == m['source_rows'] and again['fingerprint'] == m['fingerprint']
    assert [tuple(r.tolist()) for r in read_split(out, 'search')] == rows
