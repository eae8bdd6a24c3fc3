"""Direct logit attribution against a hand computation (final norm, then unembedding), top-k
ordering, several output hooks, and the attribute-logits task writing to the store."""

from __future__ import annotations

import io

import pytest
import torch

from lmsae.analysis.logits import direct_logit_attribution, direction_logits
from lmsae.config.base import LanguageModelConfig, RunConfig
from lmsae.dictionary.io import save_dictionary
from lmsae.dictionary.sae import SAEConfig, SparseAutoEncoder
from lmsae.errors import LmsaeError
from lmsae.hookspecs import hookimpl
from lmsae.registry import load_registry
from lmsae.runtime import RunContext
from lmsae.tasks.common import model_loader
from lmsae.testing.plugins import module

HOOK = "blocks.1.hook_resid_post"
MODEL = {"backend": "transformer_lens", "model": "tiny-random", "device": "cpu"}


def _registry():
    """The core registry plus the attribute-logits task and the local store until the core wires them."""
    base = load_registry(entry_points=False)
    extra = {}
    if "attribute-logits" not in base.names("task"):
        from lmsae.tasks import attribute_logits

        @hookimpl
        def lmsae_register_tasks():
            return [attribute_logits.SPEC]

        extra["lmsae_register_tasks"] = lmsae_register_tasks
    if "local" not in base.names("store"):
        from lmsae.stores.specs import STORE_SPECS

        @hookimpl
        def lmsae_register_stores():
            return [s for s in STORE_SPECS if s.name == "local"]

        extra["lmsae_register_stores"] = lmsae_register_stores
    return load_registry(entry_points=False, plugins=[module("dla_test", **extra)]) if extra else base


@pytest.fixture(scope="module")
def registry():
    return _registry()


@pytest.fixture(scope="module")
def lm(registry):
    lm = model_loader(registry, registry.structure(MODEL, LanguageModelConfig))()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial norm weights and biases, so that each must be handled right
        h = lm.hooked
        h.ln_final.w.copy_(1 + 0.5 * torch.randn(h.ln_final.w.shape, generator=g))
        h.ln_final.b.copy_(0.3 * torch.randn(h.ln_final.b.shape, generator=g))
        h.unembed.b_U.copy_(torch.randn(h.unembed.b_U.shape, generator=g))
    return lm


@pytest.fixture(scope="module")
def sae():
    cfg = SAEConfig(hook_point_in=HOOK, d_model=64, d_sae=40, act_fn="relu", normalization="dataset",
                    dataset_norms={HOOK: 5.0})
    model = SparseAutoEncoder(cfg)
    model.reset_parameters(torch.Generator().manual_seed(0))
    return model


@torch.no_grad()
def by_hand(lm, d: torch.Tensor, bias: bool = False) -> torch.Tensor:
    """LayerNorm of the direction as a residual vector (centre, divide by the RMS), the norm's
    weight, then W_U; biases only with ``bias``."""
    ln, unembed = lm.hooked.ln_final, lm.hooked.unembed
    c = d - d.mean(-1, keepdim=True)
    x = c / (c.pow(2).mean(-1, keepdim=True) + ln.eps).sqrt() * ln.w
    if bias:
        return (x + ln.b) @ unembed.W_U + unembed.b_U
    return x @ unembed.W_U


def test_logits_match_the_hand_computation(lm, sae):
    directions = sae.decoder_directions()[HOOK]
    # raw-space directions: the decoder rows divided by the dataset normalisation factor
    torch.testing.assert_close(directions, sae.W_D.detach() * 5.0 / 8.0)
    rows = directions[[0, 3, 17, 39]]
    torch.testing.assert_close(direction_logits(lm, rows), by_hand(lm, rows), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(direction_logits(lm, rows, include_bias=True), by_hand(lm, rows, bias=True),
                               rtol=1e-4, atol=1e-4)
    # normalised like a residual vector: the direction's length does not matter (up to the norm's eps)
    torch.testing.assert_close(direction_logits(lm, 7 * rows), direction_logits(lm, rows), rtol=1e-2, atol=1e-2)


def test_top_tokens_in_order_with_decoded_strings(lm, sae):
    out = direct_logit_attribution(sae, lm, top_k=5, batch=7)  # several feature batches
    assert [a.index for a in out] == list(range(40))
    expected = by_hand(lm, sae.decoder_directions()[HOOK])
    for a in out:
        row = expected[a.index]
        assert [t.token_id for t in a.top_positive] == torch.topk(row, 5).indices.tolist()
        assert [t.token_id for t in a.top_negative] == torch.topk(row, 5, largest=False).indices.tolist()
        pos = [t.logit for t in a.top_positive]
        neg = [t.logit for t in a.top_negative]
        assert pos == sorted(pos, reverse=True) and neg == sorted(neg) and neg[-1] < pos[-1]
        assert pos[0] == pytest.approx(float(row.max()), rel=1e-4, abs=1e-4)
        for t in (*a.top_positive, *a.top_negative):
            assert t.token == lm.tokenizer.decode([t.token_id])


def test_several_output_hooks_sum_their_logits(lm, sae):
    class TwoHooks:
        def decoder_directions(self):
            d = sae.decoder_directions()[HOOK]
            return {"a": d, "b": d.flip(0)}

    out = direct_logit_attribution(TwoHooks(), lm, top_k=3)
    d = sae.decoder_directions()[HOOK]
    summed = by_hand(lm, d) + by_hand(lm, d.flip(0))
    assert [t.token_id for t in out[2].top_positive] == torch.topk(summed[2], 3).indices.tolist()


def test_rms_norm_model():
    import transformer_lens as tl

    from lmsae.models.transformer_lens import ByteTokenizer

    cfg = tl.HookedTransformerConfig(n_layers=1, d_model=16, d_head=4, n_heads=4, d_mlp=32, d_vocab=300, n_ctx=8,
                                     act_fn="gelu", normalization_type="RMS", device="cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hooked = tl.HookedTransformer(cfg, move_to_device=False)
    with torch.no_grad():
        hooked.ln_final.w.copy_(torch.linspace(0.5, 1.5, 16))

    class LM:
        pass

    lm = LM()
    lm.hooked, lm.tokenizer = hooked, ByteTokenizer()
    d = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    by_hand_rms = d / (d.pow(2).mean(-1, keepdim=True) + hooked.ln_final.eps).sqrt() * hooked.ln_final.w
    torch.testing.assert_close(direction_logits(lm, d), by_hand_rms @ hooked.unembed.W_U, rtol=1e-4, atol=1e-4)


def test_errors(lm, sae):
    class NotTransformerLens:
        tokenizer = None

    with pytest.raises(LmsaeError, match="TransformerLens"):
        direct_logit_attribution(sae, NotTransformerLens())
    with pytest.raises(LmsaeError, match="d_model=64"):
        direction_logits(lm, torch.zeros(2, 32))


def test_task_stores_the_attributions(registry, sae, tmp_path):
    save_dictionary(sae, tmp_path / "dla-sae", registry)
    data = {"task": "attribute-logits", "pretrained": {"path": str(tmp_path / "dla-sae")}, "model": MODEL,
            "top_k": 4, "device": "cpu", "series": "s", "store": {"type": "local", "directory": str(tmp_path / "st")}}
    out = io.StringIO()
    cfg = registry.structure(data, RunConfig)
    result = registry.get("task", "attribute-logits").factory(cfg, RunContext(registry=registry, out=out,
                                                                              progress=False))
    assert len(result) == 40
    from lmsae.stores.configs import LocalStoreConfig
    from lmsae.stores.local import LocalStore

    with LocalStore(LocalStoreConfig(directory=tmp_path / "st")) as store:
        record = store.get_dictionary("dla-sae", "s")
        assert record.model_name == "tiny-random" and record.config["d_sae"] == 40
        for i in (0, 39):
            stored = store.get_logit_attribution("dla-sae", "s", i)
            assert [t.token_id for t in stored.top_positive] == [t.token_id for t in result[i].top_positive]
            assert [t.logit for t in stored.top_negative] == pytest.approx([t.logit for t in result[i].top_negative])
            assert len(stored.top_positive) == 4
    text = out.getvalue()
    assert "attributed 40 features of 'dla-sae'" in text and "promotes" in text and "suppresses" in text


def test_example_config_round_trips(registry):
    from lmsae.tasks.attribute_logits import example

    cfg = example(registry)
    plain = registry.unstructure(cfg)
    assert plain["task"] == "attribute-logits" and plain["model"]["model"] == "smollm2-135m"
    assert registry.structure(plain, RunConfig) == cfg
