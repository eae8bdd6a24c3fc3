"""FeatureAnalyzer against a naive per-feature reference: statistics, histograms, top contexts,
quantile samples of the final maximum, determinism and batching independence."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from lmsae.analysis.features import FeatureAnalyzer, histogram_edges, quantile_sampling_name, sample_keys
from lmsae.errors import DataError, ShapeError

EDGES = (0.0, 0.25, 0.5, 0.75, 1.0)
BANDS = [quantile_sampling_name(lo, hi) for lo, hi in itertools.pairwise(EDGES)]


def make_stream(n_seq=96, T=12, F=24, seed=0, dead=(5,), growth=True):
    """Sparse non-negative activations (n_seq, T, F), tokens, masks, metas; feature ``dead`` never fires.

    With ``growth`` the scale rises along the stream so that running maxima grow (re-binning)."""
    g = torch.Generator().manual_seed(seed)
    acts = torch.rand(n_seq, T, F, generator=g) ** 3 * 5
    acts = acts * (torch.rand(n_seq, T, F, generator=g) < 0.3)
    if growth:
        acts = acts * torch.linspace(0.2, 2.0, n_seq)[:, None, None]
    acts[..., list(dead)] = 0
    acts[0, 0, 7] = 1e-6   # below the histogram range: clamped into the first bin
    acts[1, 2, 8] = 1e6    # above it: the last bin
    tokens = torch.randint(0, 500, (n_seq, T), generator=g)
    mask = torch.rand(n_seq, T, generator=g) > 0.15
    mask[0, 0] = mask[1, 2] = True
    metas = [{"dataset": "d", "document_index": i, "offset": 3 * i} for i in range(n_seq)]
    return acts, tokens, mask, metas


def run(analyzer, stream, batch):
    acts, tokens, mask, metas = stream
    for s in range(0, acts.shape[0], batch):
        analyzer.update(acts[s:s + batch], tokens[s:s + batch], mask[s:s + batch], metas[s:s + batch])
    return analyzer.finish()


def reference(stream, n_top, bins):
    """Naive per-feature statistics: one Python loop per feature and sequence."""
    acts, _, mask, _ = stream
    a = (acts * mask[..., None]).numpy().astype(np.float64)
    edges = histogram_edges(bins)
    out = []
    for f in range(a.shape[2]):
        col = a[:, :, f]
        nz = np.abs(col[col != 0])
        hist = np.zeros(bins, dtype=np.int64)
        for v in nz:
            hist[min(max(np.searchsorted(edges, v, side="right") - 1, 0), bins - 1)] += 1
        peaks = col.max(axis=1)
        ranked = sorted((-peaks[s], s) for s in range(len(peaks)) if peaks[s] > 0)
        out.append({"count": int((col > 0).sum()), "max": float(col.max()), "hist": hist,
                    "top": [s for _, s in ranked[:n_top]], "peaks": peaks})
    return out


@pytest.fixture(scope="module")
def stream():
    return make_stream()


@pytest.fixture(scope="module")
def result(stream):
    return run(FeatureAnalyzer(24, n_top=5, n_per_quantile=3, histogram_bins=16, seed=3), stream, batch=8)


@pytest.fixture(scope="module")
def expected(stream):
    return reference(stream, n_top=5, bins=16)


def test_statistics_and_histogram_match_the_reference(stream, result, expected):
    n_unmasked = int(stream[2].sum())
    assert [r.index for r in result] == list(range(24))
    for r, e in zip(result, expected):
        assert r.act_count == e["count"]
        assert r.n_tokens == n_unmasked
        assert r.max_activation == pytest.approx(e["max"], rel=1e-6)
        np.testing.assert_array_equal(r.histogram_counts, e["hist"])
        np.testing.assert_allclose(r.histogram_edges, histogram_edges(16))
        assert r.histogram_counts.sum() == r.act_count  # activations are >= 0 here
    assert result[7].histogram_counts[0] >= 1 and result[8].histogram_counts[-1] >= 1


def test_top_activations_are_the_reference_top_n(stream, result, expected):
    acts, tokens, mask, metas = stream
    for r, e in zip(result, expected):
        if r.act_count == 0:
            continue
        top = next(s for s in r.samplings if s.name == "top_activations")
        ids = [s.meta["document_index"] for s in top.samples]
        assert ids == e["top"]  # same sequences, in order
        for s, i in zip(top.samples, ids):
            np.testing.assert_array_equal(s.tokens, tokens[i].numpy())
            row = (acts[i, :, r.index] * mask[i]).numpy()
            np.testing.assert_array_equal(s.activations, row)
            assert s.activations[~mask[i].numpy()].sum() == 0  # masked positions are 0
            assert s.meta == metas[i]
            assert s.peak == pytest.approx(e["peaks"][i])


def test_quantile_samples_lie_in_their_band_of_the_final_max(stream, result, expected):
    acts, _, mask, _ = stream
    total = 0
    for r, e in zip(result, expected):
        if r.act_count == 0:
            continue
        names = [s.name for s in r.samplings]
        assert names == ["top_activations", *BANDS]
        M = e["max"]
        for j, name in enumerate(BANDS):
            samples = next(s for s in r.samplings if s.name == name).samples
            assert len(samples) <= 3
            ids = [s.meta["document_index"] for s in samples]
            assert len(set(ids)) == len(ids)
            for s, i in zip(samples, ids):
                peak = e["peaks"][i]
                assert EDGES[j] * M < peak <= EDGES[j + 1] * M + 1e-6, (r.index, name, peak, M)
                np.testing.assert_array_equal(s.activations, (acts[i, :, r.index] * mask[i]).numpy())
            total += len(samples)
    assert total > 0


def test_without_rebinning_each_band_is_the_bottom_k_of_its_population():
    # the first batch holds every feature's maximum: bands never move, so the sample of a band is
    # exactly its n members with the smallest keys
    acts, tokens, mask, metas = make_stream(growth=False, seed=1)
    acts[0, 1] = 50.0
    mask[0, 1] = True
    stream = (acts, tokens, mask, metas)
    out = run(FeatureAnalyzer(24, n_top=4, n_per_quantile=3, seed=11), stream, batch=6)
    exp = reference(stream, n_top=4, bins=64)
    keys = sample_keys(11, np.arange(acts.shape[0]), np.arange(24))
    for r, e in zip(out, exp):
        if r.act_count == 0:
            continue
        M = e["max"]
        for j, name in enumerate(BANDS):
            population = [s for s, p in enumerate(e["peaks"]) if EDGES[j] * M < p <= EDGES[j + 1] * M]
            want = sorted(population, key=lambda s: keys[s, r.index])[:3]
            got = next(s for s in r.samplings if s.name == name).samples
            assert sorted(x.meta["document_index"] for x in got) == sorted(want)


def test_quantile_sampling_is_unbiased_when_the_max_grows():
    # 2,000 features with identical activations but independent keys are 2,000 independent
    # trials. First 5 sequences in band 0 and 60 in band 1 (which overflows: few survive its
    # selection); then the max grows and half of band 1 moves down into band 0. Each member of
    # the final band 0 must be kept with the same probability: resident or moved down.
    F, n = 2000, 4
    g = torch.Generator().manual_seed(0)
    residents = torch.rand(5, generator=g) * 0.2 + 0.02            # (0, 0.25] of max 1.0
    band1 = torch.rand(60, generator=g) * 0.2 + 0.3                  # (0.25, 0.5]
    peaks = torch.cat([torch.tensor([1.0]), residents, band1, torch.tensor([1.6])])
    n_seq = len(peaks)
    acts = peaks[:, None, None].expand(n_seq, 2, F).contiguous()
    tokens = torch.zeros(n_seq, 2, dtype=torch.long)
    mask = torch.ones(n_seq, 2, dtype=torch.bool)
    metas = [{"i": i} for i in range(n_seq)]
    analyzer = FeatureAnalyzer(F, n_top=1, n_per_quantile=n, seed=5)
    for lo, hi in [(0, 22), (22, 44), (44, 66), (66, 67)]:  # the max grows in the last batch
        analyzer.update(acts[lo:hi], tokens[lo:hi], mask[lo:hi], metas[lo:hi])
    out = analyzer.finish()
    M = 1.6
    members = [i for i in range(n_seq) if 0 < peaks[i] <= 0.25 * M]
    counts = np.zeros(n_seq)
    for r in out:
        samples = next(x for x in r.samplings if x.name == BANDS[0]).samples
        assert len(samples) <= n
        for s in samples:
            counts[s.meta["i"]] += 1
    assert set(np.flatnonzero(counts)) <= set(members)
    resident = list(range(1, 6))
    moved = [i for i in members if i > 5]
    assert len(moved) >= 20
    rate_resident, rate_moved = counts[resident].mean() / F, counts[moved].mean() / F
    # binomial noise of these group means is a few % of the rate; a survivor bias (keeping the
    # residents plus the few moved sequences that survived band 1) would be ~10x
    assert rate_resident == pytest.approx(rate_moved, rel=0.25), (rate_resident, rate_moved)


def test_deterministic_for_a_seed_and_independent_of_batching(stream):
    def signature(res):
        return [(r.act_count, r.max_activation, r.histogram_counts.tolist(),
                 [(s.name, [x.meta["document_index"] for x in s.samples]) for s in r.samplings]) for r in res]

    kw = {"n_top": 5, "n_per_quantile": 3, "histogram_bins": 16}
    a = signature(run(FeatureAnalyzer(24, seed=3, **kw), stream, batch=8))
    assert a == signature(run(FeatureAnalyzer(24, seed=3, **kw), stream, batch=8))
    other = signature(run(FeatureAnalyzer(24, seed=4, **kw), stream, batch=8))
    assert [x[:3] for x in other] == [x[:3] for x in a]  # statistics do not depend on the seed
    assert other != a  # the quantile samples do

    # with every maximum reached in the first sequence, the batch size changes nothing at all
    acts, tokens, mask, metas = make_stream(growth=False, seed=2)
    acts[0, 0] = 40.0
    mask[0, 0] = True
    s2 = (acts, tokens, mask, metas)
    assert (signature(run(FeatureAnalyzer(24, seed=1, **kw), s2, batch=4))
            == signature(run(FeatureAnalyzer(24, seed=1, **kw), s2, batch=16)))


def test_ties_keep_the_earliest_sequences():
    acts = torch.zeros(6, 3, 2)
    acts[:, 1, 0] = 1.0         # six equal peaks
    acts[4, 2, 0] = 2.0         # one higher
    acts[:, 0, 1] = torch.arange(6.0)
    analyzer = FeatureAnalyzer(2, n_top=3, n_per_quantile=0)
    for s in range(0, 6, 2):
        analyzer.update(acts[s:s + 2], torch.zeros(2, 3, dtype=torch.long), None, [{"i": s}, {"i": s + 1}])
    top = analyzer.finish()[0].samplings
    assert [s.name for s in top] == ["top_activations"]
    assert [x.meta["i"] for x in top[0].samples] == [4, 0, 1]


def test_dead_feature_record(result):
    dead = result[5]
    assert dead.act_count == 0 and dead.max_activation == 0.0 and dead.samplings == ()
    assert dead.histogram_counts.sum() == 0 and dead.density == 0.0
    assert dead.n_tokens > 0
    empty = FeatureAnalyzer(3).finish()
    assert [(r.index, r.act_count, r.samplings) for r in empty] == [(0, 0, ()), (1, 0, ()), (2, 0, ())]


def test_input_errors():
    analyzer = FeatureAnalyzer(4, context_size=5)
    with pytest.raises(ShapeError, match=r"\(batch, context, 4\)"):
        analyzer.update(torch.zeros(2, 5, 3), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(DataError, match="context_size=5"):
        analyzer.update(torch.zeros(2, 6, 4), torch.zeros(2, 6, dtype=torch.long))
    with pytest.raises(ShapeError, match="tokens"):
        analyzer.update(torch.zeros(2, 5, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="quantile_edges"):
        FeatureAnalyzer(4, quantile_edges=(0.0, 0.5, 0.9))


def test_performance_smoke():
    # the quickstart dictionary's size: 4,608 features, 16 sequences of 128 tokens per update
    F, T, B, k = 4608, 128, 16, 32
    g = torch.Generator().manual_seed(0)
    analyzer = FeatureAnalyzer(F, seed=0)
    for step in range(5):
        acts = torch.zeros(B * T, F)
        acts.scatter_(1, torch.randint(0, F, (B * T, k), generator=g), torch.rand(B * T, k, generator=g) * (1 + step))
        analyzer.update(acts.view(B, T, F), torch.randint(0, 1000, (B, T), generator=g),
                        torch.ones(B, T, dtype=torch.bool), [{"i": step * B + i} for i in range(B)])
    out = analyzer.finish()
    assert len(out) == F and sum(r.act_count for r in out) > 0


def test_sample_extras_are_computed_for_kept_samples_only_and_stored_with_them(stream):
    """The callback sees (batch sequence, feature, peak token) of each newly kept sample; every
    kept sample carries the row computed for it (checked against the sample's own data)."""
    acts, tokens, mask, metas = stream
    calls = []
    analyzer = FeatureAnalyzer(24, n_top=5, n_per_quantile=3, histogram_bins=16, seed=3)
    batch = 8
    for s in range(0, acts.shape[0], batch):
        def extras(seq, feat, pos, s=s):
            calls.append(len(seq))
            doc = torch.as_tensor(seq) + s  # document index of the sequence in the stream
            # only firing (sequence, feature) pairs, at their peak token
            fired = acts[doc, :, torch.as_tensor(feat)] * mask[doc]
            assert bool((fired.amax(1) > 0).all())
            torch.testing.assert_close(fired[torch.arange(len(doc)), torch.as_tensor(pos)], fired.amax(1))
            token = tokens[doc, torch.as_tensor(pos)]
            return {"where": torch.stack([doc, torch.as_tensor(feat), torch.as_tensor(pos)], 1).to(torch.int32),
                    "token": token.numpy()}
        analyzer.update(acts[s:s + batch], tokens[s:s + batch], mask[s:s + batch], metas[s:s + batch],
                        sample_extras=extras)
    result = analyzer.finish()
    kept = 0
    for r in result:
        for sampling in r.samplings:
            for sample in sampling.samples:
                doc, feat, pos = (int(v) for v in sample.extras["where"])
                assert doc == sample.meta["document_index"] and feat == r.index
                assert sample.activations[pos] == sample.activations.max() > 0  # the peak token
                assert int(sample.extras["token"]) == int(sample.tokens[pos])
                assert sample.extras["where"].dtype == np.int32
                kept += 1
    assert kept > 0 and sum(calls) >= kept


def test_sample_extras_errors_are_plugin_errors(stream):
    from lmsae.errors import PluginError

    acts, tokens, mask, metas = stream
    a = FeatureAnalyzer(24, n_top=2, n_per_quantile=0)
    with pytest.raises(PluginError, match="one row per sample"):
        a.update(acts[:4], tokens[:4], mask[:4], sample_extras=lambda s, f, p: {"x": np.zeros((1, 2))})
    a = FeatureAnalyzer(24, n_top=2, n_per_quantile=0)
    with pytest.raises(PluginError, match="dict of arrays"):
        a.update(acts[:4], tokens[:4], mask[:4], sample_extras=lambda s, f, p: [1, 2])
    a = FeatureAnalyzer(24, n_top=2, n_per_quantile=0)
    a.update(acts[:4], tokens[:4], mask[:4], sample_extras=lambda s, f, p: {"x": np.zeros((len(s), 2))})
    with pytest.raises(PluginError, match="changed from"):
        a.update(acts[4:40], tokens[4:40], mask[4:40], sample_extras=lambda s, f, p: {"x": np.zeros((len(s), 3))})
