"""A CLT spliced into a (tiny, random) TransformerLens model: every layer's MLP output at once
(closed loop, mode "all") and one layer at a time (mode "per_hook"), against hand computations."""

from __future__ import annotations

import pytest
import torch

from lmsae.errors import LmsaeError

pytestmark = pytest.mark.lm

splice = pytest.importorskip("lmsae.evaluation.splice")


@pytest.fixture(scope="module")
def lm():
    pytest.importorskip("transformer_lens")
    from lmsae.models.transformer_lens import TransformerLensConfig, build_transformer_lens

    return build_transformer_lens(TransformerLensConfig(model="tiny-random", device="cpu", dtype="float64"))


@pytest.fixture(scope="module")
def tokens(lm):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (3, 10), generator=g)
    tokens[:, 0] = lm.bos_token_id
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, 0] = False  # BOS is never replaced
    return tokens, mask


def clt_for(lm, make_model, **kw):
    model = make_model(n_layers=2, d_model=64, d_sae=32, **kw)
    with torch.no_grad():  # small decoders: the spliced model stays close to the clean one
        for w in model.W_D:
            w.mul_(0.05)
        model.b_D.mul_(0.05)
    return model


def hand_closed_loop_ce(lm, model, tokens, mask):
    """Closed loop by hand: at blocks.j.hook_mlp_out use the CLT formula on the ln2 inputs this same pass
    captured, y_j = sum_{i<=j} relu(x_i W_E[i] + b_E[i]) W_D[i->j] + b_D[j] (replaced where mask is True)."""
    captured = {}

    def capture(i):
        def hook(act, hook):
            captured[i] = act.detach().clone()
        return hook

    def replace(j):
        def hook(act, hook):
            y = model.b_D[j].detach().clone().expand_as(act).clone()
            for i in range(j + 1):
                f = torch.relu(captured[i] @ model.W_E[i].detach() + model.b_E[i].detach())
                y = y + f @ model.W_D[j][i].detach()
            return torch.where(mask[..., None], y.to(act.dtype), act)
        return hook

    hooks = []
    for i in range(2):
        hooks.append((f"blocks.{i}.ln2.hook_normalized", capture(i)))
        hooks.append((f"blocks.{i}.hook_mlp_out", replace(i)))
    with torch.no_grad():
        logits = lm.hooked.run_with_hooks(tokens, fwd_hooks=hooks, return_type="logits")
    lp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    return -lp.gather(-1, tokens[:, 1:, None]).squeeze(-1)


def test_all_layers_spliced_at_once_is_a_closed_loop(lm, tokens, make_model):
    tokens, mask = tokens
    model = clt_for(lm, make_model, act_fn="relu")
    out = splice.splice_losses(lm, model, tokens, mask=mask, mode="all")
    expected = hand_closed_loop_ce(lm, model, tokens, mask)
    valid = out["valid"]
    torch.testing.assert_close(out["spliced"][valid], expected[valid], rtol=1e-9, atol=1e-9)
    assert not torch.allclose(out["spliced"][valid], out["clean"][valid])


def test_per_layer_splicing_reports_every_output_hook(lm, tokens, make_model):
    tokens, mask = tokens
    model = clt_for(lm, make_model, act_fn="topk", top_k=4, decoder_norm_gating=True)
    out = splice.splice_losses(lm, model, tokens, mask=mask, mode="per_hook")
    for j in range(2):
        assert f"spliced/blocks.{j}.hook_mlp_out" in out and f"ablated/blocks.{j}.hook_mlp_out" in out
    sums = {k: float(v[out["valid"]].sum()) for k, v in out.items() if k != "valid"}
    metrics = splice.splice_metrics(sums, float(out["valid"].sum()))
    assert "ce_loss_recovered" in metrics and "ce_loss_recovered/blocks.1.hook_mlp_out" in metrics


def test_a_clt_writing_zeros_equals_zero_ablation(lm, tokens, make_model):
    tokens, mask = tokens
    model = clt_for(lm, make_model, act_fn="jumprelu", jumprelu_init_threshold=0.2)
    with torch.no_grad():
        for w in model.W_D:
            w.zero_()
        model.b_D.zero_()
    for mode in ("all", "per_hook"):
        out = splice.splice_losses(lm, model, tokens, mask=mask, mode=mode)
        torch.testing.assert_close(out["spliced"], out["ablated"], rtol=0, atol=1e-12)


def test_across_layer_topk_needs_per_hook_mode(lm, tokens, make_model):
    tokens, mask = tokens
    model = clt_for(lm, make_model, act_fn="layertopk", top_k=8)
    with pytest.raises(LmsaeError, match="per_hook"):
        splice.splice_losses(lm, model, tokens, mask=mask, mode="all")
    out = splice.splice_losses(lm, model, tokens, mask=mask, mode="per_hook")
    assert "spliced/blocks.1.hook_mlp_out" in out and "spliced/blocks.0.hook_mlp_out" in out
    assert "spliced" not in out  # no joint closed-loop number for an across-layer TopK
