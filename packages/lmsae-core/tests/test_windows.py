"""Context windows (pack, pad/truncate), their exact resume, and the training mask."""

from __future__ import annotations

import random

import pytest
import torch

from lmsae.data.windows import WindowState, pack, pad_truncate, training_mask
from lmsae.errors import CheckpointError, DataError

BOS, EOS, PAD = 1, 2, 0


def _docs(seed: int, n: int = 25, max_len: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    docs = [[rng.randrange(3, 50) for _ in range(rng.choice([0, 1, 3, rng.randrange(max_len)]))] for _ in range(n)]
    docs.append([rng.randrange(3, 50) for _ in range(5 * max_len)])  # spans many windows
    return docs


def _naive_pack(docs, context_size, prepend_bos, add_eos):
    """Reference: concatenate (with EOS), chunk, BOS at each window start, drop the tail."""
    stream, origin = [], []
    for d, doc in enumerate(docs):
        seq = doc + ([EOS] if add_eos else [])
        stream += seq
        origin += [(d, o) for o in range(len(seq))]
    n = context_size - 1 if prepend_bos else context_size
    out = []
    for k in range(len(stream) // n):
        body = stream[k * n:(k + 1) * n]
        out.append(([BOS] * prepend_bos + body, origin[k * n]))
    return out


@pytest.mark.parametrize("prepend_bos", [True, False])
@pytest.mark.parametrize("add_eos", [True, False])
@pytest.mark.parametrize("context_size", [2, 5, 16])
def test_pack_matches_naive_reference(prepend_bos, add_eos, context_size):
    docs = _docs(context_size)
    windows = list(pack(docs, context_size, bos_id=BOS, eos_id=EOS, prepend_bos=prepend_bos, add_eos=add_eos))
    expected = _naive_pack(docs, context_size, prepend_bos, add_eos)
    assert len(windows) == len(expected) > 3
    for w, (tokens, (doc, offset)) in zip(windows, expected):
        assert w.tokens.dtype == torch.long and w.tokens.shape == (context_size,)
        assert w.tokens.tolist() == tokens
        assert w.attention_mask.tolist() == [1] * context_size  # packed windows are never padded
        assert w.meta == {"document_index": doc, "offset": offset}


def test_pack_every_window_starts_with_bos_and_accepts_tensors():
    docs = [torch.arange(3, 3 + n) for n in (7, 0, 12, 4)]
    windows = list(pack(docs, 6, bos_id=BOS, eos_id=EOS))
    assert all(w.tokens[0] == BOS for w in windows)
    expected = _naive_pack([d.tolist() for d in docs], 6, True, True)
    assert [w.tokens.tolist() for w in windows] == [t for t, _ in expected]


def test_pack_drops_the_incomplete_tail():
    windows = list(pack([[5, 6, 7]], 3, bos_id=BOS, eos_id=EOS))  # stream 5 6 7 EOS: 2 windows of 2
    assert [w.tokens.tolist() for w in windows] == [[BOS, 5, 6], [BOS, 7, EOS]]
    assert list(pack([[5, 6, 7]], 8, bos_id=BOS, eos_id=EOS)) == []


def test_pad_truncate():
    docs = [[5, 6, 7], [], list(range(3, 20)), [9]]
    windows = list(pad_truncate(docs, 6, bos_id=BOS, pad_id=PAD))
    assert [w.tokens.tolist() for w in windows] == [
        [BOS, 5, 6, 7, PAD, PAD], [BOS, 3, 4, 5, 6, 7], [BOS, 9, PAD, PAD, PAD, PAD]]
    assert [w.attention_mask.tolist() for w in windows] == [[1, 1, 1, 1, 0, 0], [1] * 6, [1, 1, 0, 0, 0, 0]]
    # the empty document is skipped but indices stay those of the documents
    assert [w.meta for w in windows] == [{"document_index": i, "offset": 0} for i in (0, 2, 3)]
    no_bos = list(pad_truncate(docs, 4, bos_id=None, pad_id=EOS, prepend_bos=False))
    assert [w.tokens.tolist() for w in no_bos] == [[5, 6, 7, EOS], [3, 4, 5, 6], [9, EOS, EOS, EOS]]
    assert [w.attention_mask.tolist() for w in no_bos] == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def _resume_check(make, docs, n_total):
    full = list(make(docs, WindowState()))
    assert len(full) == n_total
    for n in sorted({0, 1, 2, 3, n_total // 2, n_total - 1, n_total}):
        it = make(docs, WindowState())
        for _ in range(n):
            next(it)
        state = WindowState.from_dict(it.state.to_dict())
        # a fresh iterator over the documents from state.document on: nothing earlier is read
        rest = list(make(docs[state.document:], state))
        assert len(rest) == n_total - n
        for a, b in zip(rest, full[n:]):
            assert torch.equal(a.tokens, b.tokens) and torch.equal(a.attention_mask, b.attention_mask)
            assert a.meta == b.meta


@pytest.mark.parametrize("prepend_bos", [True, False])
def test_pack_resume_is_exact(prepend_bos):
    docs = _docs(7)
    n = len(_naive_pack(docs, 7, prepend_bos, True))

    def make(d, start):
        return pack(d, 7, bos_id=BOS, eos_id=EOS, prepend_bos=prepend_bos, start=start)

    _resume_check(make, docs, n)


def test_pack_state_points_past_each_window():
    it = pack([[5, 6], [7, 8], [9]], 3, bos_id=BOS, eos_id=EOS)  # stream 5 6 E 7 8 E 9 E
    assert it.state == WindowState(0, 0)
    next(it)
    assert it.state == WindowState(0, 2)  # the next window starts at document 0's EOS
    next(it)
    assert it.state == WindowState(1, 1)
    next(it)
    assert it.state == WindowState(2, 0)  # document 1 fully consumed
    assert next(it).meta == {"document_index": 2, "offset": 0}
    assert it.state == WindowState(3, 0)


def test_pad_resume_is_exact():
    docs = _docs(3)
    n = sum(1 for d in docs if d)

    def make(d, start):
        return pad_truncate(d, 9, bos_id=BOS, pad_id=PAD, start=start)

    _resume_check(make, docs, n)


def test_window_argument_errors():
    with pytest.raises(DataError, match="BOS"):
        pack([[3]], 4, bos_id=None, eos_id=EOS)
    with pytest.raises(DataError, match="EOS"):
        pack([[3]], 4, bos_id=BOS, eos_id=None)
    with pytest.raises(ValueError, match="context_size"):
        pack([[3]], 1, bos_id=BOS, eos_id=EOS)
    with pytest.raises(CheckpointError, match="offset"):
        pad_truncate([[3]], 4, bos_id=BOS, pad_id=PAD, start=WindowState(0, 2))
    with pytest.raises(DataError, match="resume"):
        list(pack([[3, 4]], 2, bos_id=BOS, eos_id=EOS, start=WindowState(0, 9)))
    with pytest.raises(CheckpointError, match="offset"):
        WindowState.from_dict({"document": 1, "offset": -1})
    with pytest.raises(CheckpointError):
        WindowState.from_dict([1, 2])


# --- training mask ---------------------------------------------------------------------------


def test_mask_keeps_eos_even_when_pad_equals_eos():
    # pad_id == eos_id == 2: the last two positions are padding, position 2 is a real EOS
    tokens = torch.tensor([[BOS, 7, EOS, 8, EOS, EOS]])
    attn = torch.tensor([[1, 1, 1, 1, 0, 0]])
    mask = training_mask(tokens, attn, bos_id=BOS, eos_id=EOS)
    assert mask.dtype == torch.bool and mask.shape == tokens.shape
    assert mask.tolist() == [[False, True, True, True, False, False]]
    masked_eos = training_mask(tokens, attn, bos_id=BOS, eos_id=EOS, mask_eos=True)
    assert masked_eos.tolist() == [[False, True, False, True, False, False]]


def test_mask_bos_only_at_the_prepended_position():
    # GPT-2 style: BOS and EOS share one id; only position 0 is the prepended BOS
    tokens = torch.tensor([[EOS, 7, EOS, 8]])
    attn = torch.ones_like(tokens)
    assert training_mask(tokens, attn, bos_id=EOS, eos_id=EOS).tolist() == [[False, True, True, True]]
    assert training_mask(tokens, attn, bos_id=EOS, eos_id=EOS, mask_bos=False).tolist() == [[True] * 4]
    # without prepend_bos nothing is masked as BOS
    assert training_mask(tokens, attn, bos_id=EOS, eos_id=EOS, prepend_bos=False).tolist() == [[True] * 4]


def test_mask_ignored_ids_and_no_attention_mask():
    tokens = torch.tensor([BOS, 7, 9, 7, 4])
    mask = training_mask(tokens, None, bos_id=BOS, eos_id=EOS, ignore_token_ids=[7, 4])
    assert mask.tolist() == [False, False, True, False, False]


def test_mask_checks_the_bos_position():
    with pytest.raises(DataError, match="position 0"):
        training_mask(torch.tensor([[5, 6]]), None, bos_id=BOS, eos_id=EOS)


def test_mask_of_windows_end_to_end():
    windows = list(pad_truncate([[5, EOS], [6]], 4, bos_id=BOS, pad_id=EOS))
    tokens = torch.stack([w.tokens for w in windows])
    attn = torch.stack([w.attention_mask for w in windows])
    assert training_mask(tokens, attn, bos_id=BOS, eos_id=EOS).tolist() == [
        [False, True, True, False], [False, True, False, False]]
