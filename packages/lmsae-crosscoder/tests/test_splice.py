"""A crosscoder across layers spliced into a (tiny random) language model, one head at a time."""

from __future__ import annotations

import math

import pytest
import torch

from lmsae_crosscoder.config import CrosscoderConfig
from lmsae_crosscoder.model import Crosscoder

pytestmark = pytest.mark.lm

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
D = 64


@pytest.fixture(scope="module")
def lm():
    pytest.importorskip("transformer_lens")
    from lmsae.models.transformer_lens import TransformerLensConfig, build_transformer_lens

    return build_transformer_lens(TransformerLensConfig(model="tiny-random", device="cpu", dtype="float64"))


@pytest.fixture(scope="module")
def batch(lm):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (3, 10), generator=g)
    tokens[:, 0] = lm.bos_token_id
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, 0] = False
    return tokens, mask


def identity_crosscoder() -> Crosscoder:
    """Reconstructs every head exactly: head h owns features ±e_j (relu(x) - relu(-x) = x)."""
    model = Crosscoder(CrosscoderConfig(hook_points=HOOKS, d_model=D, d_sae=4 * D, act_fn="relu",
                                        normalization="none")).double()
    eye = torch.eye(D, dtype=torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for h in range(2):
            block = slice(2 * D * h, 2 * D * (h + 1))
            model.W_E[h, :, block] = torch.cat([eye, -eye], dim=1)
            model.W_D[h, block, :] = torch.cat([eye, -eye], dim=0)
    return model


def test_per_head_splice_of_a_perfect_crosscoder_recovers_all_the_loss(lm, batch):
    splice = pytest.importorskip("lmsae.evaluation.splice")
    tokens, mask = batch
    out = splice.splice_losses(lm, identity_crosscoder(), tokens, mask=mask, mode="per_hook")
    for hook in HOOKS:
        torch.testing.assert_close(out[f"spliced/{hook}"], out["clean"], rtol=1e-10, atol=1e-10)
        assert bool((out[f"kl/{hook}"].abs() < 1e-10).all())
    # head 0 is reached before head 1's input: no closed-loop joint splice for a crosscoder across layers
    assert "spliced" not in out
    acc = splice.SpliceAccumulator()
    acc.update(out)
    metrics = acc.metrics()
    for hook in HOOKS:
        assert math.isclose(metrics[f"ce_loss_recovered/{hook}"], 1.0, rel_tol=1e-9)


def test_each_head_is_spliced_alone_from_clean_inputs(lm, batch):
    splice = pytest.importorskip("lmsae.evaluation.splice")
    tokens, mask = batch
    model = identity_crosscoder()
    shift = torch.randn(D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        model.b_D[1].copy_(shift)  # only head 1's prediction is wrong (not a constant: LayerNorm centres)
    out = splice.splice_losses(lm, model, tokens, mask=mask, mode="per_hook")
    torch.testing.assert_close(out[f"spliced/{HOOKS[0]}"], out["clean"], rtol=1e-10, atol=1e-10)
    assert not torch.allclose(out[f"spliced/{HOOKS[1]}"], out["clean"])
    # the same as replacing blocks.1.hook_resid_post by hand where the mask is True
    shifted = {HOOKS[1]: lambda act, hook: torch.where(mask[..., None], act + shift, act)}
    manual = lm.token_losses(tokens, replacements=shifted)
    valid = out["valid"]
    torch.testing.assert_close(out[f"spliced/{HOOKS[1]}"][valid], manual[valid].double(), rtol=1e-5, atol=1e-5)
    with pytest.raises(splice.SpliceOrderError, match="per_hook"):
        splice.splice_losses(lm, model, tokens, mask=mask, mode="all")
