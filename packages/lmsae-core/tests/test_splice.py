"""Splicing a dictionary into the language model: per-token CE/KL against hand computations."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import pytest
import torch
from torch import Tensor, nn

from lmsae.config import DictionaryConfig, config_class, option
from lmsae.dictionary.base import SparseDictionary
from lmsae.errors import DataError, LmsaeError
from lmsae.evaluation import SpliceAccumulator, evaluate_splice, splice_losses, splice_metrics

pytestmark = pytest.mark.lm

L0_RESID = "blocks.0.hook_resid_post"
L1_RESID = "blocks.1.hook_resid_post"
LN2 = ["blocks.0.ln2.hook_normalized", "blocks.1.ln2.hook_normalized"]
MLP = ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"]


@pytest.fixture(scope="module")
def lm():
    pytest.importorskip("transformer_lens")
    from lmsae.models.transformer_lens import TransformerLensConfig, build_transformer_lens

    return build_transformer_lens(TransformerLensConfig(model="tiny-random", device="cpu", dtype="float64"))


@pytest.fixture(scope="module")
def batch(lm):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (3, 12), generator=g)
    tokens[:, 0] = lm.bos_token_id
    attention = torch.ones_like(tokens)
    attention[2, 9:] = 0  # right padding
    tokens[2, 9:] = lm.pad_token_id
    mask = attention.bool().clone()
    mask[:, 0] = False  # BOS: never spliced, never counted
    return tokens, attention, mask


# --- test dictionaries ---------------------------------------------------------------------------


@config_class
class MapConfig(DictionaryConfig):
    """A test dictionary predicting each output hook as a linear map of one input hook."""

    name: ClassVar[str] = "test-map"
    pairs: list[tuple[str, str]] = option(doc="(input hook, output hook) pairs.")
    d: int = option(64, doc="Width.")

    @property
    def hooks_in(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(i for i, _ in self.pairs))

    @property
    def hooks_out(self) -> tuple[str, ...]:
        return tuple(o for _, o in self.pairs)

    @property
    def n_features(self) -> int:
        return self.d


class MapDictionary(SparseDictionary):
    """``out = in @ W`` per pair (W = gain * identity by default); every input is required unless
    ``partial`` (then outputs are predicted from whichever inputs are present, like a cross-layer
    transcoder that predicts layer l from layers <= l)."""

    def __init__(self, config: MapConfig, gain: float = 1.0, weight: Tensor | None = None, partial: bool = False):
        super().__init__(config)
        w = torch.eye(config.d, dtype=torch.float64) * gain if weight is None else weight
        self.W = nn.Parameter(w.clone())
        self.partial = partial
        self.calls: list[dict[str, Tensor]] = []

    def hook_dims(self) -> dict[str, int]:
        return {h: self.config.d for h in self.config.hook_points}

    def reconstruct_hooks(self, inputs: Mapping[str, Tensor], mask: Tensor | None = None) -> dict[str, Tensor]:
        missing = [h for h in self.config.hooks_in if h not in inputs]
        if missing and not self.partial:
            raise DataError(f"missing {missing}")
        self.calls.append({k: v.clone() for k, v in inputs.items()})
        return {o: inputs[i] @ self.W for i, o in self.config.pairs if i in inputs}


def map_dict(pairs, **kw) -> MapDictionary:
    return MapDictionary(MapConfig(pairs=pairs, normalization="none"), **kw)


# --- hand computations ------------------------------------------------------------------------------


def hand_log_probs(lm, tokens, attention, fwd_hooks=()) -> Tensor:
    with torch.no_grad():
        logits = lm.hooked.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks), return_type="logits")
    return torch.log_softmax(logits[:, :-1].double(), dim=-1)


def hand_ce(lp, tokens) -> Tensor:
    return -lp.gather(-1, tokens[:, 1:, None]).squeeze(-1)


def hand_kl(lp_clean, lp) -> Tensor:
    p = lp_clean.exp()
    return (p * (lp_clean - lp)).sum(-1)


def where_mask(mask, new):
    def hook(act, hook):
        return torch.where(mask[..., None], new(act), act)

    return hook


def check_close(got: Tensor, want: Tensor, valid: Tensor, atol=1e-9):
    torch.testing.assert_close(got[valid].double(), want[valid], atol=atol, rtol=0)


# --- tests ------------------------------------------------------------------------------------------


def test_sae_matches_a_hand_computation(lm, batch):
    from lmsae.dictionary.sae import SAEConfig, SparseAutoEncoder

    tokens, attention, mask = batch
    sae = SparseAutoEncoder(SAEConfig(hook_point_in=L0_RESID, d_model=64, d_sae=256, act_fn="topk", top_k=16,
                                      normalization="dataset", dataset_norms={L0_RESID: 3.0}))
    torch.nn.init.normal_(sae.b_D, std=0.1)
    sae = sae.double()
    out = splice_losses(lm, sae, tokens, attention, mask)
    valid = mask[:, :-1] & attention[:, 1:].bool()
    assert torch.equal(out["valid"], valid)
    assert out["clean"].shape == (3, 11) and out["clean"].dtype == torch.float64

    lp_clean = hand_log_probs(lm, tokens, attention)

    def predict(act):
        return sae.forward_raw({L0_RESID: act, "mask": mask})

    lp_spliced = hand_log_probs(lm, tokens, attention, [(L0_RESID, where_mask(mask, predict))])
    lp_ablated = hand_log_probs(lm, tokens, attention, [(L0_RESID, where_mask(mask, torch.zeros_like))])
    check_close(out["clean"], hand_ce(lp_clean, tokens), valid)
    check_close(out["spliced"], hand_ce(lp_spliced, tokens), valid)
    check_close(out["ablated"], hand_ce(lp_ablated, tokens), valid)
    check_close(out["kl"], hand_kl(lp_clean, lp_spliced), valid)
    check_close(out["kl_ablated"], hand_kl(lp_clean, lp_ablated), valid)
    # the clean CE is the backend's own token loss (computed in float32)
    check_close(out["clean"], lm.token_losses(tokens, attention).double(), valid, atol=1e-5)  # float32 there
    assert bool((out["kl"][valid] > 0).all()) and bool((out["kl_ablated"][valid] > out["kl"][valid]).all())

    m = splice_metrics({k: float(v[valid].sum()) for k, v in out.items() if k != "valid"}, int(valid.sum()))
    n = valid.sum()
    ce = {k: float(out[k][valid].sum() / n) for k in ("clean", "spliced", "ablated")}
    assert m["ce_loss_recovered"] == pytest.approx((ce["ablated"] - ce["spliced"]) / (ce["ablated"] - ce["clean"]),
                                                   abs=1e-12)
    assert m["ce_loss_increase"] == pytest.approx(ce["spliced"] - ce["clean"], abs=1e-12)
    assert m["kl_div_score"] == pytest.approx((m["kl_div_ablated"] - m["kl_div"]) / m["kl_div_ablated"], abs=1e-12)


def test_perfect_dictionary_recovers_everything(lm, batch):
    tokens, attention, mask = batch
    ident = map_dict([(L0_RESID, L0_RESID)], gain=1.0)
    acc = SpliceAccumulator()
    acc.update(splice_losses(lm, ident, tokens, attention, mask))
    m = acc.metrics()
    assert m["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-6)
    assert m["kl_div"] == pytest.approx(0.0, abs=1e-6)
    assert m["ce_loss_increase"] == pytest.approx(0.0, abs=1e-6)
    assert m["kl_div_score"] == pytest.approx(1.0, abs=1e-6)
    assert m["kl_div_ablated"] > 0.01 and m["ce_ablated"] > m["ce_clean"]


def test_zero_dictionary_recovers_nothing(lm, batch):
    tokens, attention, mask = batch
    zero = map_dict([(L0_RESID, L0_RESID)], gain=0.0)
    m = evaluate_splice(lm, zero, [{"tokens": tokens, "attention_mask": attention, "mask": mask}], n_tokens=10)
    assert m["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert m["kl_div"] == pytest.approx(m["kl_div_ablated"], abs=1e-9)
    assert m["kl_div_score"] == pytest.approx(0.0, abs=1e-6)


def test_masked_positions_keep_their_activation(lm, batch):
    tokens, attention, mask = batch
    zero = map_dict([(L0_RESID, L0_RESID)], gain=0.0)
    seen: list[Tensor] = []
    # a plain torch hook on the next hook point sees what block 1 receives
    handle = lm.hooked.blocks[1].hook_resid_pre.register_forward_hook(lambda mod, inp, out: seen.append(out.clone()))
    try:
        splice_losses(lm, zero, tokens, attention, mask)
    finally:
        handle.remove()
    clean, spliced, ablated = seen  # the three forward passes, in order
    assert not torch.equal(clean[:, 0], torch.zeros_like(clean[:, 0]))
    torch.testing.assert_close(spliced[:, 0], clean[:, 0], rtol=0, atol=0)  # BOS untouched
    torch.testing.assert_close(ablated[:, 0], clean[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(spliced[2, 9:], clean[2, 9:], rtol=0, atol=0)  # padding untouched
    assert torch.count_nonzero(spliced[mask]) == 0 and torch.count_nonzero(ablated[mask]) == 0


def test_default_mask_splices_every_real_position(lm, batch):
    tokens, attention, _ = batch
    zero = map_dict([(L0_RESID, L0_RESID)], gain=0.0)
    seen: list[Tensor] = []
    handle = lm.hooked.blocks[1].hook_resid_pre.register_forward_hook(lambda mod, inp, out: seen.append(out.clone()))
    try:
        out = splice_losses(lm, zero, tokens, attention)
    finally:
        handle.remove()
    assert torch.count_nonzero(seen[1][attention.bool()]) == 0
    assert torch.equal(out["valid"], attention[:, :-1].bool() & attention[:, 1:].bool())


def test_transcoder_reads_the_spliced_runs_input(lm, batch):
    from lmsae.dictionary.sae import SAEConfig, SparseAutoEncoder

    tokens, attention, mask = batch
    tc = SparseAutoEncoder(SAEConfig(hook_point_in=LN2[0], hook_point_out=MLP[0], d_model=64, d_sae=128,
                                     act_fn="relu", normalization="none")).double()
    inputs: list[Tensor] = []
    original = tc.reconstruct_hooks

    def spy(x, m=None):
        inputs.append(x[LN2[0]].clone())
        return original(x, m)

    tc.reconstruct_hooks = spy
    out = splice_losses(lm, tc, tokens, attention, mask)
    valid = out["valid"]
    captured: dict[str, Tensor] = {}

    def capture(act, hook):
        captured["ln2"] = act

    def predict(act):
        return original({LN2[0]: captured["ln2"]}, mask)[MLP[0]]

    lp_clean = hand_log_probs(lm, tokens, attention)
    lp = hand_log_probs(lm, tokens, attention, [(LN2[0], capture), (MLP[0], where_mask(mask, predict))])
    check_close(out["spliced"], hand_ce(lp, tokens), valid)
    check_close(out["kl"], hand_kl(lp_clean, lp), valid)
    assert len(inputs) == 1  # one prediction in the spliced pass
    torch.testing.assert_close(inputs[0], captured["ln2"], rtol=0, atol=0)


def test_closed_loop_with_several_outputs(lm, batch):
    # layer 1's input is read in the spliced run, after layer 0's output was replaced
    tokens, attention, mask = batch
    g = torch.Generator().manual_seed(1)
    w = torch.eye(64, dtype=torch.float64) + 0.3 * torch.randn(64, 64, generator=g, dtype=torch.float64)
    pairs = list(zip(LN2, MLP, strict=True))
    clt = map_dict(pairs, weight=w, partial=True)
    out = splice_losses(lm, clt, tokens, attention, mask)
    valid = out["valid"]
    assert [sorted(c) for c in clt.calls] == [[LN2[0]], LN2]  # one call per new input

    captured: dict[str, Tensor] = {}

    def capture(act, hook):
        captured[hook.name] = act

    hooks = [(LN2[0], capture), (MLP[0], where_mask(mask, lambda a: captured[LN2[0]] @ w)),
             (LN2[1], capture), (MLP[1], where_mask(mask, lambda a: captured[LN2[1]] @ w))]
    lp_closed = hand_log_probs(lm, tokens, attention, hooks)
    check_close(out["spliced"], hand_ce(lp_closed, tokens), valid)

    # the open loop (clean inputs) gives other numbers: the loop is really closed
    clean_in = lm.activations(tokens, LN2)
    hooks_open = [(MLP[0], where_mask(mask, lambda a: clean_in[LN2[0]] @ w)),
                  (MLP[1], where_mask(mask, lambda a: clean_in[LN2[1]] @ w))]
    lp_open = hand_log_probs(lm, tokens, attention, hooks_open)
    assert (hand_ce(lp_open, tokens) - out["spliced"])[valid].abs().max() > 1e-6

    # ablation zeroes both outputs at once
    zero = [(h, where_mask(mask, torch.zeros_like)) for h in MLP]
    check_close(out["ablated"], hand_ce(hand_log_probs(lm, tokens, attention, zero), tokens), valid)


def test_per_hook_mode(lm, batch):
    tokens, attention, mask = batch
    g = torch.Generator().manual_seed(2)
    w = torch.eye(64, dtype=torch.float64) + 0.3 * torch.randn(64, 64, generator=g, dtype=torch.float64)
    pairs = list(zip(LN2, MLP, strict=True))
    # the base contract: every input is needed, so layer 0's output cannot be spliced jointly
    crosscoder = map_dict(pairs, weight=w)
    with pytest.raises(LmsaeError, match="per_hook") as info:
        splice_losses(lm, crosscoder, tokens, attention, mask)
    assert "blocks.0.hook_mlp_out" in str(info.value) and "blocks.1.ln2.hook_normalized" in str(info.value)

    out = splice_losses(lm, crosscoder, tokens, attention, mask, mode="per_hook")
    valid = out["valid"]
    assert "spliced" not in out  # hooks out of order: no joint numbers
    lp_clean = hand_log_probs(lm, tokens, attention)
    clean_in = lm.activations(tokens, LN2)
    for i, (hin, hout) in enumerate(pairs):
        lp = hand_log_probs(lm, tokens, attention, [(hout, where_mask(mask, lambda a, h=hin: clean_in[h] @ w))])
        check_close(out[f"spliced/{hout}"], hand_ce(lp, tokens), valid)
        check_close(out[f"kl/{hout}"], hand_kl(lp_clean, lp), valid)
        lp0 = hand_log_probs(lm, tokens, attention, [(hout, where_mask(mask, torch.zeros_like))])
        check_close(out[f"ablated/{hout}"], hand_ce(lp0, tokens), valid)
        check_close(out[f"kl_ablated/{hout}"], hand_kl(lp_clean, lp0), valid)

    acc = SpliceAccumulator()
    acc.update(out)
    m = acc.metrics()
    assert {f"ce_loss_recovered/{h}" for h in MLP} <= set(m) and "ce_loss_recovered" not in m

    # in order (a partial dictionary): per-hook and joint numbers
    clt = map_dict(pairs, weight=w, partial=True)
    both = splice_losses(lm, clt, tokens, attention, mask, mode="per_hook")
    joint = splice_losses(lm, clt, tokens, attention, mask, mode="all")
    for key in ("clean", "spliced", "ablated", "kl", "kl_ablated"):
        torch.testing.assert_close(both[key], joint[key], rtol=0, atol=0)
    # per-hook numbers use the clean inputs, whatever the dictionary can do with a subset of them
    torch.testing.assert_close(both[f"spliced/{MLP[1]}"], out[f"spliced/{MLP[1]}"], rtol=0, atol=0)


def test_single_output_per_hook_equals_all(lm, batch):
    tokens, attention, mask = batch
    d = map_dict([(L0_RESID, L0_RESID)], gain=0.5)
    a = splice_losses(lm, d, tokens, attention, mask)
    p = splice_losses(lm, d, tokens, attention, mask, mode="per_hook")
    for key in ("spliced", "ablated", "kl", "kl_ablated"):
        torch.testing.assert_close(p[key], a[key], rtol=0, atol=1e-12)
        torch.testing.assert_close(p[f"{key}/{L0_RESID}"], a[key], rtol=0, atol=1e-12)


def test_hooks_out_of_order_raise(lm, batch):
    tokens, attention, mask = batch
    backwards = map_dict([(L1_RESID, L0_RESID)])
    with pytest.raises(LmsaeError, match='mode="per_hook"'):
        splice_losses(lm, backwards, tokens, attention, mask)
    out = splice_losses(lm, backwards, tokens, attention, mask, mode="per_hook")
    assert f"spliced/{L0_RESID}" in out and "spliced" not in out


def test_accumulator_uses_sums_not_batch_ratios(lm, batch):
    tokens, attention, mask = batch
    d = map_dict([(L0_RESID, L0_RESID)], gain=0.7)
    whole = splice_losses(lm, d, tokens, attention, mask)
    acc = SpliceAccumulator()
    for rows in (slice(0, 1), slice(1, 3)):
        acc.update(splice_losses(lm, d, tokens[rows], attention[rows], mask[rows]))
    one = SpliceAccumulator()
    one.update(whole)
    a, b = acc.metrics(), one.metrics()
    assert a["n_tokens"] == b["n_tokens"] == int(whole["valid"].sum())
    for key in b:
        assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12), key


def test_metrics_edge_cases():
    m = splice_metrics({"clean": 2.0, "spliced": 2.0, "ablated": 2.0, "kl": 0.0, "kl_ablated": 0.0}, 1)
    assert math.isnan(m["ce_loss_recovered"]) and math.isnan(m["kl_div_score"])
    assert splice_metrics({}, 0) == {"n_tokens": 0.0}


def test_argument_checks(lm, batch):
    tokens, _, mask = batch
    d = map_dict([(L0_RESID, L0_RESID)])
    with pytest.raises(LmsaeError, match="mode"):
        splice_losses(lm, d, tokens, mode="some")
    with pytest.raises(LmsaeError, match="mask"):
        splice_losses(lm, d, tokens, mask=mask[:, :5])
    with pytest.raises(LmsaeError, match="context"):
        splice_losses(lm, d, tokens[:, :1])


def test_float32_model_dictionary_on_another_dtype(batch):
    pytest.importorskip("transformer_lens")
    from lmsae.models.transformer_lens import TransformerLensConfig, build_transformer_lens

    lm32 = build_transformer_lens(TransformerLensConfig(model="tiny-random", device="cpu"))
    tokens, attention, mask = batch
    ident = map_dict([(L0_RESID, L0_RESID)])  # float64 parameters, float32 model
    out = splice_losses(lm32, ident, tokens, attention, mask)
    assert out["clean"].dtype == torch.float32
    valid = out["valid"]
    assert out["kl"][valid].abs().max() < 1e-5
