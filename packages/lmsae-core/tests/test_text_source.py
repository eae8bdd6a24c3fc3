"""The 'text' source: dataset -> tokens -> windows -> language-model activations."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import pytest
import torch
from torch import Tensor

from lmsae._text import did_you_mean
from lmsae.activations.protocol import ActivationStream, SourceContext
from lmsae.config.fields import FieldValueError
from lmsae.data.datasets import DatasetConfig
from lmsae.data.windows import pack
from lmsae.errors import CheckpointError, DataError
from lmsae.models.base import LanguageModel
from lmsae.sources.text_source import TextSource, TextSourceConfig, build_text_source

pytest.importorskip("datasets")

HOOKS = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")


class FakeLM:
    """A deterministic stand-in language model: byte tokenizer, embedding lookup, causal means.

    Ids: 0-255 bytes, 256 = BOS, 257 = EOS, padding with EOS (pad_token_id == eos_token_id).
    ``blocks.i.hook_resid_post`` at position t is (i + 1) * mean of the embeddings of tokens 0..t,
    so it depends on the whole prefix (like a causal model) and never on later padding.
    """

    name = "fake"
    tokenizer = None
    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 257
    d_model = 6
    n_layers = 2
    n_ctx = 64
    d_vocab = 258
    device = torch.device("cpu")

    def __init__(self, token_mask_ids: Sequence[int] | None = None):
        self.embed = torch.randn(self.d_vocab, self.d_model, generator=torch.Generator().manual_seed(0))
        self.forwarded = 0  # sequences run through the model
        if token_mask_ids is not None:
            ids = torch.tensor(list(token_mask_ids))
            # a model with its own mask rules (like the TransformerLens backend)
            self.token_mask = lambda tokens, attention_mask: ~torch.isin(tokens, ids) & attention_mask.bool()

    def hook_dims(self, hook_points: Sequence[str]) -> dict[str, int]:
        valid = [f"blocks.{i}.hook_resid_post" for i in range(self.n_layers)]
        for h in hook_points:
            if h not in valid:
                raise DataError(f"unknown hook point {h!r} for model 'fake'{did_you_mean(h, valid)}")
        return {h: self.d_model for h in hook_points}

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def activations(self, tokens: Tensor, hook_points: Sequence[str],
                    attention_mask: Tensor | None = None) -> dict[str, Tensor]:
        self.forwarded += tokens.shape[0]
        x = self.embed[tokens]
        running = x.cumsum(1) / torch.arange(1, tokens.shape[1] + 1)[:, None]
        return {h: running * (int(h.split(".")[1]) + 1) for h in hook_points}

    def token_losses(self, tokens: Tensor, attention_mask: Tensor | None = None,
                     replacements: Mapping | None = None) -> Tensor:
        raise NotImplementedError

    def logits(self, tokens: Tensor, attention_mask: Tensor | None = None,
               replacements: Mapping | None = None) -> Tensor:
        raise NotImplementedError


TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "",
    "Sparse autoencoders decompose activations into features.",
    "short",
    "A much longer document " * 9,
    "é unicode ✓",
    "x",
    "Last one, with some words to make it span a window or two.",
]


@pytest.fixture
def dataset(tmp_path) -> DatasetConfig:
    f = tmp_path / "docs.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return DatasetConfig(path=str(f), cache_dir=str(tmp_path / "hf"))


def _context(lm, hooks=HOOKS, shard=(0, 1), progress=False) -> SourceContext:
    return SourceContext(hook_points=tuple(hooks), layout="sequences", shard=shard, progress=progress,
                         language_model=(lambda: lm) if lm is not None else None)


def _source(dataset, lm=None, shard=(0, 1), **kw) -> TextSource:
    lm = lm if lm is not None else FakeLM()
    cfg = TextSourceConfig(dataset=dataset, **{"context_size": 16, "model_batch_size": 3, **kw})
    return build_text_source(cfg, _context(lm, shard=shard))


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if k == "meta":
            assert a[k] == b[k]
        else:
            assert torch.equal(a[k], b[k]), k


def test_chunks_tokens_mask_meta_and_activations(dataset):
    lm = FakeLM()
    source = _source(dataset, lm)
    assert isinstance(source, ActivationStream) and isinstance(lm, LanguageModel)
    chunks = list(source)
    expected = [w for w in pack(lm.tokenize(TEXTS), 16, bos_id=256, eos_id=257)]
    assert sum(c["tokens"].shape[0] for c in chunks) == len(expected) == source.windows > 6
    assert [c["tokens"].shape[0] for c in chunks[:-1]] == [3] * (len(chunks) - 1)
    tokens = torch.cat([c["tokens"] for c in chunks])
    assert torch.equal(tokens, torch.stack([w.tokens for w in expected]))
    assert (tokens == 257).any()  # EOS separators are present (and kept by the mask below)
    docs = lm.tokenize(TEXTS)
    for c in chunks:
        b = c["tokens"].shape[0]
        assert set(c) == {*HOOKS, "tokens", "mask", "meta"}
        for h in HOOKS:
            assert c[h].shape == (b, 16, 6) and c[h].dtype == torch.float32 and c[h].device.type == "cpu"
            assert torch.equal(c[h], lm.activations(c["tokens"], [h])[h])  # the LM's activations on these tokens
        assert c["tokens"].dtype == torch.int64 and c["mask"].dtype == torch.bool
        assert c["mask"].shape == (b, 16)
        assert not c["mask"][:, 0].any()  # the prepended BOS
        assert c["mask"][:, 1:].all()  # everything else, EOS included (pad_token_id == eos_token_id)
        for row, meta in zip(c["tokens"], c["meta"]):
            assert set(meta) == {"dataset", "document_index", "offset", "shard"}
            assert meta["dataset"] == dataset.path and meta["shard"] == 0
            doc = docs[meta["document_index"]] + [257]
            assert int(row[1]) == doc[meta["offset"]]  # meta points at the window's first token


def test_pad_windows_mask_padding_but_not_eos_ids(dataset):
    chunks = list(_source(dataset, windows="pad"))
    n_docs = sum(1 for t in TEXTS if t)
    assert sum(c["tokens"].shape[0] for c in chunks) == n_docs
    c = chunks[0]
    first = list(TEXTS[0].encode())
    assert c["tokens"][0, 1:].tolist() == first[:15]
    row = c["meta"].index(next(m for m in c["meta"] if m["document_index"] == 3))
    assert c["tokens"][row, :6].tolist() == [256, *b"short"]
    assert c["mask"][row].tolist() == [False] + [True] * 5 + [False] * 10  # padding from the attention mask
    assert [m["document_index"] for ch in chunks for m in ch["meta"]] == [i for i, t in enumerate(TEXTS) if t]


def test_mask_options(dataset):
    c = next(iter(_source(dataset, mask_eos=True, mask_bos=False, ignore_token_ids=[ord("o")])))
    t, m = c["tokens"], c["mask"]
    assert m[:, 0].all()
    assert not m[t == 257].any() and not m[t == ord("o")].any()
    assert m[(t != 257) & (t != ord("o"))].all()


def test_the_source_owns_its_mask_not_the_model(dataset):
    # the model's own masking settings apply where it builds batches itself; the source decides
    # which of its tokens are trained on (one place to look, no surprising intersection)
    lm = FakeLM(token_mask_ids=[ord("e")])
    c = next(iter(_source(dataset, lm)))
    t, m = c["tokens"], c["mask"]
    assert not m[:, 0].any()  # the BOS the source prepended
    assert m[:, 1:].all() and (t == ord("e")).any()


@pytest.mark.parametrize("windows", ["pack", "pad"])
def test_resume_is_exact_and_skips_the_model(dataset, windows):
    full = list(_source(dataset, windows=windows))
    for k in sorted({0, 1, 2, len(full) - 1, len(full)}):
        first = _source(dataset, windows=windows)
        it = iter(first)
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(first.state_dict()))  # JSON round trip, as in a checkpoint
        lm = FakeLM()
        resumed = _source(dataset, lm, windows=windows)
        resumed.load_state_dict(state)
        rest = list(resumed)
        assert len(rest) == len(full) - k
        for a, b in zip(rest, full[k:]):
            _same(a, b)
        # the language model ran only on the windows after the resume point
        assert lm.forwarded == sum(c["tokens"].shape[0] for c in full[k:])
        assert resumed.windows == sum(c["tokens"].shape[0] for c in full)


def test_iterating_again_continues(dataset):
    source = _source(dataset)
    it = iter(source)
    first = next(it)
    rest = list(source)  # a new iterator continues after the chunk already taken
    full = list(_source(dataset))
    _same(first, full[0])
    assert len(rest) == len(full) - 1


def test_sharding(dataset):
    whole = [m["document_index"] for c in _source(dataset, windows="pad") for m in c["meta"]]
    parts = []
    for rank in range(3):
        chunks = list(_source(dataset, windows="pad", shard=(rank, 3)))
        assert all(m["shard"] == rank for c in chunks for m in c["meta"])
        parts.append([m["document_index"] for c in chunks for m in c["meta"]])
    assert [i for p in parts for i in p] == whole  # disjoint, covering, global document indices
    packed = [sorted({m["document_index"] for c in _source(dataset, shard=(r, 2)) for m in c["meta"]})
              for r in range(2)]
    assert packed[0] and packed[1] and max(packed[0]) < min(packed[1])
    with pytest.raises(CheckpointError, match="shard"):
        _source(dataset, shard=(1, 2)).load_state_dict(_source(dataset, shard=(0, 2)).state_dict())


def test_max_sequences(dataset):
    source = _source(dataset, max_sequences=7)
    assert [c["tokens"].shape[0] for c in source] == [3, 3, 1]
    assert source.windows == 7 and list(source) == []
    # split over data-parallel ranks (4 + 3)
    assert [sum(c["tokens"].shape[0] for c in _source(dataset, max_sequences=7, shard=(r, 2))) for r in range(2)] \
        == [4, 3]
    with pytest.raises(CheckpointError, match="max_sequences"):
        _source(dataset, max_sequences=2).load_state_dict({"windows": 5, "document": 0, "offset": 0})


def test_needs_a_language_model(dataset):
    cfg = TextSourceConfig(dataset=dataset)
    with pytest.raises(DataError, match=r"needs a \[model\] table"):
        TextSource(cfg, _context(None))


def test_unknown_hook_is_reported(dataset):
    with pytest.raises(DataError, match="did you mean 'blocks.1.hook_resid_post'"):
        TextSource(TextSourceConfig(dataset=dataset), _context(FakeLM(), hooks=["blocks.1.hook_resid_pos"]))


def test_config_and_model_checks(dataset):
    with pytest.raises(FieldValueError):
        TextSourceConfig(dataset=dataset, windows="slide")
    with pytest.raises(FieldValueError, match="context_size"):
        TextSourceConfig(dataset=dataset, context_size=1)
    with pytest.raises(DataError, match="context length"):
        _source(dataset, context_size=65)
    lm = FakeLM()
    lm.bos_token_id = None
    with pytest.raises(DataError, match="prepend_bos"):
        _source(dataset, lm)
    assert list(_source(dataset, lm, prepend_bos=False))  # fine without BOS
    with pytest.raises(CheckpointError):
        _source(dataset).load_state_dict({"windows": -1})


def test_progress_bar(dataset, capsys):
    source = TextSource(TextSourceConfig(dataset=dataset, context_size=16, max_sequences=4),
                        _context(FakeLM(), progress=True))
    assert sum(c["tokens"].shape[0] for c in source) == 4
    assert "seq" in capsys.readouterr().err


# --- with the TransformerLens backend ('tiny-random'; importing transformer_lens takes seconds) ---


@pytest.fixture(scope="module")
def tiny_lm():
    pytest.importorskip("transformer_lens")
    tl = pytest.importorskip("lmsae.models.transformer_lens")
    return tl.build_transformer_lens(tl.TransformerLensConfig(model="tiny-random", device="cpu"))


@pytest.mark.lm
def test_with_transformer_lens_tiny_random(tiny_lm, dataset):
    hooks = ("blocks.0.hook_resid_post", "blocks.1.hook_mlp_out")
    cfg = TextSourceConfig(dataset=dataset, context_size=32, model_batch_size=4, max_sequences=6)
    source = TextSource(cfg, _context(tiny_lm, hooks=hooks))
    chunks = list(source)
    assert [c["tokens"].shape[0] for c in chunks] == [4, 2]
    eos = tiny_lm.eos_token_id
    assert tiny_lm.pad_token_id == eos == tiny_lm.bos_token_id  # GPT-2 style special tokens
    for c in chunks:
        for h in hooks:
            assert c[h].shape == (c["tokens"].shape[0], 32, tiny_lm.d_model) and c[h].dtype == torch.float32
            ref = tiny_lm.activations(c["tokens"], [h])[h]
            torch.testing.assert_close(c[h], ref.float())
        # BOS masked, EOS separators kept even though BOS, EOS and padding share one id
        assert not c["mask"][:, 0].any()
        assert c["mask"][:, 1:].all()
    assert any((c["tokens"][:, 1:] == eos).any() for c in chunks)
    state = source.state_dict()
    assert state["windows"] == 6


def test_token_only_stream_never_runs_the_model(dataset):
    # with no hook point requested the source yields tokens, masks and metadata only
    lm = FakeLM()
    config = TextSourceConfig(dataset=dataset, context_size=8, model_batch_size=4)
    source = TextSource(config, SourceContext(hook_points=(), layout="sequences", language_model=lambda: lm,
                                              progress=False))
    chunk = next(iter(source))
    assert set(chunk) == {"tokens", "mask", "meta"} and chunk["tokens"].shape == (4, 8)
    assert lm.forwarded == 0
