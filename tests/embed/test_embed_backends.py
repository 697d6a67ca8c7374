"""Embedders: ONNX vs sentence-transformers parity, shapes, cache, model resolution."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiprime.config import load_settings
from aiprime.embed import (
    CachedEmbedder,
    Embedder,
    EmbeddingCache,
    load_embedder,
    resolve_model_path,
)
from aiprime.embed.onnx import OnnxEmbedder, _pooling_mode, length_batches

SENTENCES = [
    "The cat sat on the mat.",
    "A feline was resting on a rug.",
    "Quarterly revenue grew by twelve percent, beating analyst expectations.",
    "How do I reset my password?",
    "",  # empty string still gets a vector
    "Ünïcödé text with accents and emoji 🚀 should not crash the tokenizer.",
]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def minilm_torch(minilm_dir: Path):
    from aiprime.embed.st import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder(minilm_dir, threads=2)


@pytest.fixture(scope="module")
def minilm_int8(minilm_dir: Path, models_dir: Path):
    return OnnxEmbedder.from_pretrained(
        minilm_dir, export_dir=models_dir / "onnx", quantize=True, threads=2
    )


def test_resolve_bundled_model(minilm_dir: Path) -> None:
    assert (minilm_dir / "config.json").is_file()
    assert resolve_model_path("sentence-transformers/all-MiniLM-L6-v2") == minilm_dir
    assert resolve_model_path(str(minilm_dir)) == minilm_dir.resolve()


def test_resolve_unknown_model_is_a_clear_error() -> None:
    with pytest.raises(FileNotFoundError, match=r"'no-such-model-xyz'.*not a local directory"):
        resolve_model_path("no-such-model-xyz")
    with pytest.raises(FileNotFoundError, match="Hugging Face cache"):
        resolve_model_path("someorg/also-not-here")


def test_onnx_fp32_matches_torch(minilm_onnx, minilm_torch) -> None:
    a = minilm_onnx.encode(SENTENCES)
    b = minilm_torch.encode(SENTENCES)
    assert a.shape == b.shape == (len(SENTENCES), 384)
    assert cosines(a, b).min() > 0.999


def test_onnx_int8_close_to_torch(minilm_int8, minilm_torch) -> None:
    real = [s for s in SENTENCES if s]  # the empty string is a degenerate 2-token input
    a = minilm_int8.encode(real)
    b = minilm_torch.encode(real)
    assert cosines(a, b).min() > 0.98
    assert minilm_int8.model_id.endswith("|onnx-int8")


@pytest.mark.parametrize("which", ["minilm_onnx", "minilm_torch"])
def test_encode_contract(which: str, request: pytest.FixtureRequest) -> None:
    emb = request.getfixturevalue(which)
    assert isinstance(emb, Embedder) and emb.dim == 384
    out = emb.encode(SENTENCES, batch_size=2)
    assert out.dtype == np.float32 and out.shape == (len(SENTENCES), 384)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-4)
    # batching and length-sorting never change which row belongs to which text
    single = np.stack([emb.encode([s])[0] for s in SENTENCES])
    assert cosines(out, single).min() > 0.9999
    empty = emb.encode([])
    assert empty.shape == (0, 384) and empty.dtype == np.float32
    # meaning: the paraphrase is closer than the unrelated sentence
    assert out[0] @ out[1] > out[0] @ out[2] + 0.2
    assert emb.count_tokens(["hello world", ""]) == [2, 0]


def test_long_input_is_truncated_not_an_error(minilm_onnx) -> None:
    out = minilm_onnx.encode(["word " * 2000])
    assert out.shape == (1, 384)
    assert minilm_onnx.count_tokens(["word " * 2000]) == [2000]


def test_onnx_tokenizes_like_transformers(minilm_onnx, minilm_dir: Path) -> None:
    """The Rust fast path gives exactly the ids transformers would, truncation included."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    texts = [*SENTENCES, "word " * 2000, "x" * 5000, "two\n\nparagraphs"]
    ids, types = minilm_onnx._tokenize(texts)
    ref = tok(texts, truncation=True, max_length=minilm_onnx.max_seq_length)
    assert ids == ref["input_ids"] and types == ref["token_type_ids"]
    assert max(len(x) for x in ids) == minilm_onnx.max_seq_length == 256


def test_huge_calls_are_encoded_block_by_block(minilm_onnx, monkeypatch) -> None:
    """Tokenisation is bounded per block; the rows still land where they belong."""
    texts = [*SENTENCES, "word " * 300, "short", "another short one"] * 2
    whole = minilm_onnx.encode(texts)
    monkeypatch.setattr(minilm_onnx, "block", 3)
    blocked = minilm_onnx.encode(texts)
    assert blocked.shape == whole.shape
    assert cosines(blocked, whole).min() > 0.9999


def test_onnx_graph_takes_no_mask_and_matches_torch_on_long_text(minilm_onnx, minilm_torch):
    # batches hold one token length, so the graph needs (and has) no attention mask
    assert {i.name for i in minilm_onnx.session.get_inputs()} == {"input_ids", "token_type_ids"}
    texts = ["word " * 2000, "short", "a bit longer sentence here", "another one"]
    assert cosines(minilm_onnx.encode(texts), minilm_torch.encode(texts)).min() > 0.999


@given(
    lengths=st.lists(st.integers(1, 12), max_size=60),
    max_batch=st.integers(1, 8),
    max_tokens=st.one_of(st.none(), st.integers(1, 40)),
)
def test_length_batches(lengths: list[int], max_batch: int, max_tokens: int | None) -> None:
    batches = length_batches(lengths, max_batch, max_tokens)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))  # every text exactly once
    for b in batches:
        n = lengths[b[0]]
        assert len({lengths[i] for i in b}) == 1  # nothing to pad
        cap = max_batch if max_tokens is None else max(1, min(max_batch, max_tokens // n))
        assert 1 <= len(b) <= cap  # a text longer than the token cap still gets a batch
    firsts = [lengths[b[0]] for b in batches]
    assert firsts == sorted(firsts)
    # only the last batch of each length may be short
    for n in set(lengths):
        sizes = [len(b) for b in batches if lengths[b[0]] == n]
        cap = max_batch if max_tokens is None else max(1, min(max_batch, max_tokens // n))
        assert all(x == cap for x in sizes[:-1])


def test_workers_and_token_budget_never_change_the_vectors(minilm_dir: Path, models_dir) -> None:
    """Many small batches over two workers give, row for row, what one big batch gives."""
    texts = [*SENTENCES, "word " * 300, "short", "another short one", "short"] * 3

    def emb(threads: int, batch_tokens: int) -> OnnxEmbedder:
        return OnnxEmbedder.from_pretrained(
            minilm_dir,
            export_dir=models_dir / "onnx",
            quantize=False,
            threads=threads,
            batch_tokens=batch_tokens,
        )

    one = emb(1, 1_000_000)
    two = emb(2, 8)
    assert one.workers == 1 and two.workers == 2
    ref = one.encode(texts)
    assert cosines(two.encode(texts), ref).min() > 0.9999
    assert cosines(two.encode(texts, batch_size=1), ref).min() > 0.9999


def _encode_in_child(emb: OnnxEmbedder, texts: list[str], q: Any) -> None:
    q.put(emb.encode(texts))


def test_workers_survive_fork(minilm_dir: Path, models_dir) -> None:
    """A forked child (a server's worker, a DataLoader) gets its own pool, not a hang."""
    import multiprocessing as mp

    emb = OnnxEmbedder.from_pretrained(
        minilm_dir, export_dir=models_dir / "onnx", quantize=False, threads=2, batch_tokens=8
    )
    texts = [*SENTENCES, "short", "another short one"]
    ref = emb.encode(texts)  # the parent's pool now exists and has idle workers
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    child = ctx.Process(target=_encode_in_child, args=(emb, texts, q))
    child.start()
    try:
        got = q.get(timeout=60)  # the old shared pool hung here
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
    assert cosines(got, ref).min() > 0.9999


def test_export_is_cached(minilm_dir: Path, models_dir: Path, minilm_onnx) -> None:
    exports = sorted((models_dir / "onnx").glob("*.onnx"))
    again = OnnxEmbedder.from_pretrained(
        minilm_dir, export_dir=models_dir / "onnx", quantize=False, threads=1
    )
    assert sorted((models_dir / "onnx").glob("*.onnx")) == exports  # no re-export
    assert not list((models_dir / "onnx").glob("*.partial"))
    assert again.model_id == minilm_onnx.model_id == f"{minilm_dir.name}|onnx"


# -- the cache -----------------------------------------------------------------------


def test_cached_embedder_never_reencodes(tmp_path: Path, fake_cls) -> None:
    inner = fake_cls()
    emb = CachedEmbedder(inner, EmbeddingCache(tmp_path / "c.sqlite"))
    assert (emb.model_id, emb.dim) == (inner.model_id, inner.dim)
    first = emb.encode(["a b", "c d", "a b"])
    assert inner.texts_encoded == 2 and sorted(inner.seen) == ["a b", "c d"]
    np.testing.assert_array_equal(first[0], first[2])
    second = emb.encode(["c d", "e f", "a b"])
    assert inner.seen[2:] == ["e f"]  # only the unseen text reached the model
    np.testing.assert_allclose(second[0], first[1])
    np.testing.assert_allclose(second, inner.encode(["c d", "e f", "a b"]), atol=1e-7)
    assert (emb.hits, emb.misses) == (3, 3)
    assert emb.encode([]).shape == (0, inner.dim)
    assert emb.count_tokens(["x y z"]) == [3]


def test_cache_survives_reopen(tmp_path: Path, fake_cls) -> None:
    path = tmp_path / "c.sqlite"
    inner = fake_cls()
    first = CachedEmbedder(inner, EmbeddingCache(path))
    v = first.encode(["persisted text", "another"])
    first.cache.close()
    inner2 = fake_cls()
    cache = EmbeddingCache(path)
    assert len(cache) == 2
    again = CachedEmbedder(inner2, cache).encode(["another", "persisted text"])
    assert inner2.texts_encoded == 0
    np.testing.assert_array_equal(again, v[::-1])


def test_cache_is_per_model(tmp_path: Path, fake_cls) -> None:
    cache = EmbeddingCache(tmp_path / "c.sqlite")
    a, b = fake_cls(model_id="model-a"), fake_cls(model_id="model-b")
    CachedEmbedder(a, cache).encode(["same text"])
    CachedEmbedder(b, cache).encode(["same text"])
    assert a.texts_encoded == 1 and b.texts_encoded == 1
    # a cached vector of the wrong width is ignored, not returned
    wide = fake_cls(model_id="model-a", dim=64)
    out = CachedEmbedder(wide, cache).encode(["same text"])
    assert out.shape == (1, 64) and wide.texts_encoded == 1


def test_load_embedder_uses_settings(tmp_path: Path, minilm_dir: Path, monkeypatch) -> None:
    monkeypatch.delenv("AIPRIME_HOME", raising=False)
    s = load_settings(tmp_path / "h", embed={"model": "not-a-model-anywhere"})
    with pytest.raises(FileNotFoundError, match="not-a-model-anywhere"):
        load_embedder(s)


# -- any sentence-transformers model from a local path ---------------------------------


@pytest.fixture(scope="module", params=[("bert", "mean"), ("bert", "cls"), ("distilbert", "mean")])
def tiny_st_model(request, tmp_path_factory, minilm_dir: Path) -> Path:
    """A 2-layer, 32-d BERT (or DistilBERT: no token type ids) saved as a
    sentence-transformers model with the given pooling."""
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertModel,
        DistilBertConfig,
        DistilBertModel,
    )

    try:
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Pooling, Transformer

    arch, pooling = request.param
    root = tmp_path_factory.mktemp(f"tiny-{arch}-{pooling}")
    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    torch.manual_seed(0)
    model_cls, config_cls, sizes = {
        "bert": (
            BertModel,
            BertConfig,
            dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
        ),
        "distilbert": (
            DistilBertModel,
            DistilBertConfig,
            dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64),
        ),
    }[arch]
    config = config_cls(vocab_size=tok.vocab_size, max_position_embeddings=128, **sizes)
    model_cls(config).save_pretrained(root / "hf")
    tok.save_pretrained(root / "hf")
    st = SentenceTransformer(
        modules=[Transformer(str(root / "hf"), max_seq_length=64), Pooling(32, pooling)]
    )
    out = root / f"tiny-{arch}-st-{pooling}"
    st.save(str(out))
    return out


def test_local_sentence_transformers_model_on_both_backends(
    tiny_st_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AIPRIME_HOME", raising=False)
    pooling = tiny_st_model.name.rsplit("-", 1)[1]
    assert _pooling_mode(tiny_st_model) == pooling
    out = {}
    for backend in ("torch", "onnx"):
        s = load_settings(
            tmp_path / "home", embed={"model": str(tiny_st_model), "backend": backend}
        )
        emb = load_embedder(s)
        assert isinstance(emb, CachedEmbedder)
        assert emb.dim == 32
        assert emb.model_id.split("|")[0] == tiny_st_model.name
        out[backend] = emb.encode(SENTENCES)
        assert out[backend].shape == (len(SENTENCES), 32)
        np.testing.assert_allclose(np.linalg.norm(out[backend], axis=1), 1.0, atol=1e-4)
    assert cosines(out["torch"], out["onnx"]).min() > 0.999
    assert list((tmp_path / "home" / "models" / "onnx").glob("*.onnx"))
    assert (tmp_path / "home" / "cache" / "embeddings.sqlite").is_file()


def test_unsupported_pooling_is_refused(tmp_path: Path) -> None:
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode": "max"}')
    with pytest.raises(ValueError, match=r"only mean or CLS pooling.*torch"):
        _pooling_mode(tmp_path)
    (tmp_path / "1_Pooling" / "config.json").write_text(
        '{"pooling_mode_cls_token": false, "pooling_mode_mean_tokens": true}'
    )
    assert _pooling_mode(tmp_path) == "mean"
