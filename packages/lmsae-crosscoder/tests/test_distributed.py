"""Head and feature parallelism of the crosscoder: shards on a process mesh compute exactly the
single-process model.

Four gloo processes on the CPU form a ``head = 2 x model = 2`` mesh; every case runs on three
layouts of it: ``head`` (heads split over 2 processes; the other pair of processes runs the same
layout as a ``sweep`` copy), ``model`` (features split likewise) and ``head+model`` (both). Each
process builds the shard the core trainer would (``shard_config`` with the shard's index +
``shard_state`` of the sharding rules), then mirrors the trainer's step: ``encode_pre`` /
``activate`` / ``decode`` (first model rank) or ``decode_linear`` (the others), partial
reconstructions summed over the model group, a per-head reconstruction loss summed over the head
group, the decoder-norm-weighted L1 penalty and the JumpReLU pre-activation loss (feature sums,
summed over the model group) and an AuxK-style term through ``decode_linear``. After backward,
every gradient of a parameter replicated along a split axis is summed over that axis.

The processes run this file as a script (``python test_distributed.py OUT_DIR``) and save their
shard's outputs and gradients; the tests reassemble them with ``unshard_state`` and compare them
with the float64 single-process model (tolerance 1e-10).

Two slower tests then train a crosscoder for a few steps with the core trainer on ``head = 2`` and
on ``model = 2`` (:func:`lmsae.testing.distributed.check_parallel_training`) and compare the final
weights with one process's.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import attrs
import pytest
import torch

from lmsae.errors import ShardingError
from lmsae.nn.activations import auxk_select
from lmsae.nn.losses import jumprelu_preact_loss, reconstruction_loss, sparsity_penalty

from lmsae_crosscoder.config import CrosscoderConfig, CrosscoderShardConfig
from lmsae_crosscoder.model import Crosscoder
from lmsae_crosscoder.spec import CROSSCODER_SPEC, crosscoder_shard_config

WORLD = 4
LAYOUTS = {"head": ("head",), "model": ("model",), "head+model": ("head", "model")}
D_MODEL, D_SAE, TOKENS = 5, 8, (3, 4)
TOL = 1e-10
COEF = {"sparsity": 0.1, "lp": 0.05, "aux": 0.3}

#: case name -> (number of heads, CrosscoderConfig overrides)
CASES: dict[str, tuple[int, dict]] = {
    "relu": (4, {"act_fn": "relu"}),
    "relu-gated": (4, {"act_fn": "relu", "decoder_norm_gating": True}),
    "jumprelu": (4, {"act_fn": "jumprelu"}),
    "jumprelu-gated": (2, {"act_fn": "jumprelu", "decoder_norm_gating": True}),
    "topk": (4, {"act_fn": "topk", "top_k": 3}),
    "topk-gated": (2, {"act_fn": "topk", "top_k": 3, "decoder_norm_gating": True}),
    "batchtopk": (4, {"act_fn": "batchtopk", "top_k": 3}),
    "batchtopk-gated": (4, {"act_fn": "batchtopk", "top_k": 2, "decoder_norm_gating": True}),
}


def make_config(n_heads: int, **overrides) -> CrosscoderConfig:
    kw = {"jumprelu_init_threshold": 0.5, "jumprelu_bandwidth": 2.0, **overrides}
    return CrosscoderConfig(hook_points=[f"blocks.{i}.hook_resid_post" for i in range(n_heads)], d_model=D_MODEL,
                            d_sae=D_SAE, normalization="none", **kw)


def make_model(config: CrosscoderConfig, seed: int = 0) -> Crosscoder:
    g = torch.Generator().manual_seed(seed)
    model = Crosscoder(config)
    model.reset_parameters(generator=g)
    model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        # folded heads weigh the combined decoder norm unequally (and the buffer must be sharded)
        model.head_norm_weight.copy_(torch.linspace(0.5, 2.0, config.n_heads, dtype=torch.float64))
    return model


def make_batch(config: CrosscoderConfig, seed: int = 1) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``(batch, dead)``: every head's activations ``(3, 4, d)`` with masked tokens, and a dead mask."""
    g = torch.Generator().manual_seed(seed)
    batch = {h: torch.randn(*TOKENS, D_MODEL, generator=g, dtype=torch.float64) * 2.0 + 0.3
             for h in config.hook_points}
    mask = torch.ones(TOKENS, dtype=torch.bool)
    mask[0, 1] = mask[2, 3] = False
    batch["mask"] = mask
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[[1, 2, 6]] = True
    return batch, dead


def step(model: Crosscoder, batch: dict, dead: torch.Tensor, ctx=None) -> dict[str, torch.Tensor]:
    """The trainer's loss terms on ``model`` (a shard under ``ctx``); returns the outputs."""
    from lmsae.distributed.collectives import reduce_sum

    mg = ctx.feature_group if ctx is not None else None
    hg = ctx.head_group if ctx is not None else None
    x, extras = model.prepare_input(batch)
    label = model.prepare_label(batch)
    mask = batch["mask"]
    f_axes, o_axes = model.feature_axes(x), model.output_axes(x)
    pre = model.encode_pre(x, **extras)
    acts = model.activate(pre, mask=mask)
    first_model = ctx is None or ctx.first("model")
    partial = model.decode(acts, **extras) if first_model else model.decode_linear(acts, **extras)
    recon = reduce_sum(partial, mg)
    loss = reduce_sum(reconstruction_loss(recon, label, o_axes, mask), hg)
    norm = model.decoder_norm()
    loss = loss + COEF["sparsity"] * reduce_sum(
        sparsity_penalty(acts, f_axes, kind="power", decoder_norm=norm, mask=mask), mg)
    if model.config.act_fn == "jumprelu":
        gated = pre * norm if model.config.decoder_norm_gating else pre
        loss = loss + COEF["lp"] * reduce_sum(
            jumprelu_preact_loss(gated, model.activation.threshold, f_axes, decoder_norm=norm, mask=mask), mg)
    aux = reduce_sum(model.decode_linear(auxk_select(pre, dead, 2), **extras), mg)
    loss = loss + COEF["aux"] * reduce_sum(reconstruction_loss(aux, (label - recon).detach(), o_axes, mask), hg)
    loss.backward()
    return {"loss": loss.detach(), "pre": pre.detach(), "acts": acts.detach(), "recon": recon.detach()}


# --- the processes ---------------------------------------------------------------------------------


def run_case(name: str, layout: str, full_mesh, out_dir: str) -> None:
    from lmsae.distributed.collectives import all_reduce
    from lmsae.distributed.mesh import Mesh
    from lmsae.distributed.parallel import ParallelContext, parallel
    from lmsae.distributed.sharding import rule_dim, shard_state, shard_tensor

    n_heads, overrides = CASES[name]
    cfg = make_config(n_heads, **overrides)
    full = make_model(cfg)
    axes = LAYOUTS[layout]
    if layout == "head+model":
        mesh = full_mesh
    else:  # a 2-process axis; the other pair of processes is a sweep copy (the full mesh's model groups)
        sweep = full_mesh.coord("head")
        mesh = Mesh({"sweep": 2, layout: 2}, rank=sweep * 2 + full_mesh.coord("model"),
                    groups={(layout,): full_mesh.group("model")})
    counts = {a: mesh.size(a) for a in axes}
    index = {a: mesh.coord(a) for a in axes}
    rules = CROSSCODER_SPEC.sharding_rules(cfg)
    params = {n for n, _ in full.named_parameters()}
    shard = Crosscoder(CROSSCODER_SPEC.shard_config(cfg, counts, index=index)).double()
    shard.load_state_dict(shard_state(full.state_dict(), rules, {a: (index[a], counts[a]) for a in axes},
                                      parameters=params))
    batch, dead = make_batch(cfg)
    if "head" in axes and mesh.coord("sweep") == 1:
        # a batch holding only the shard's own heads works as well as one holding all of them
        batch = {k: v for k, v in batch.items() if k == "mask" or k in shard.config.hook_points}
    if "model" in axes:
        dead = shard_tensor(dead, 0, counts["model"], index["model"])
    with parallel(ParallelContext(mesh)):
        out = step(shard, batch, dead, ParallelContext(mesh))
    grads = {}
    for n, p in shard.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        replicated = [a for a in axes if rule_dim(rules, n, a) is None]
        grads[n] = all_reduce(g, mesh.group(*replicated)) if replicated else g
    out["grads"] = grads
    out["head_norm_weight"] = shard.head_norm_weight.clone()
    key = tuple(index[a] for a in axes)
    torch.save({"key": key, **out}, Path(out_dir, f"{name}.{layout}.s{mesh.coord('sweep')}.{'-'.join(map(str, key))}.pt"))


def worker(out_dir: str) -> None:
    from lmsae.distributed.mesh import DistributedConfig, build_mesh

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    full_mesh = build_mesh(DistributedConfig(head=2, model=2, timeout_s=60.0))
    outcome = {}
    for name in CASES:
        for layout in LAYOUTS:
            try:
                run_case(name, layout, full_mesh, out_dir)
                outcome[f"{name}/{layout}"] = None
            except Exception:
                outcome[f"{name}/{layout}"] = traceback.format_exc()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(outcome))
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("crosscoder_distributed")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(WORLD),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, str(out)], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(WORLD)]
    logs = []
    for p in procs:
        try:
            stdout, _ = p.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        logs.append(stdout.decode(errors="replace"))
    for r, p in enumerate(procs):
        if p.returncode != 0:
            pytest.fail(f"process {r} exited with {p.returncode}:\n{logs[r][-4000:]}")
    return out


# --- the checks ------------------------------------------------------------------------------------


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}")
    err = float((got - want).abs().max()) if got.numel() else 0.0
    scale = max(1.0, float(want.abs().max()) if want.numel() else 0.0)
    assert err <= TOL * scale, f"{what} differs by {err:.3g} (scale {scale:.3g})"


def _gather(parts: dict[tuple, torch.Tensor], axes: tuple[str, ...], dims: dict[str, int | None]) -> torch.Tensor:
    """Reassemble outputs split along ``dims[axis]`` (None: replicated, must agree) like unshard_state."""
    from lmsae.distributed.sharding import unshard_state

    rules = {"t": {a: d for a, d in dims.items() if d is not None}}
    return unshard_state({k: {"t": v} for k, v in parts.items()}, rules, list(axes), [2] * len(axes))["t"]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", list(CASES))
def test_shards_equal_single_process(out_dir: Path, name: str, layout: str) -> None:
    from lmsae.distributed.sharding import unshard_state

    failures = [json.loads(Path(out_dir, f"rank{r}.json").read_text())[f"{name}/{layout}"] for r in range(WORLD)]
    failures = [f for f in failures if f]
    assert not failures, failures[0]
    n_heads, overrides = CASES[name]
    cfg = make_config(n_heads, **overrides)
    full = make_model(cfg)
    batch, dead = make_batch(cfg)
    ref = step(full, batch, dead)
    assert int((ref["acts"] != 0).sum()) > 0, "no active feature: the case tests nothing"
    rules = CROSSCODER_SPEC.sharding_rules(cfg)
    params = {n for n, _ in full.named_parameters()}
    axes = LAYOUTS[layout]
    feature_dims = {"head": None, "model": -1}   # pre-activations and code: replicated over heads
    output_dims = {"head": -2, "model": None}    # reconstructions: per head, summed over features
    for sweep in ((0,) if len(axes) == 2 else (0, 1)):
        shards = {}
        for path in Path(out_dir).glob(f"{name}.{layout}.s{sweep}.*.pt"):
            saved = torch.load(path)
            shards[tuple(saved["key"])] = saved
        assert len(shards) == 2 ** len(axes), sorted(shards)
        where = f"{name} on {layout} (copy {sweep})"
        for key, saved in shards.items():
            _close(saved["loss"], ref["loss"], f"{where}: the loss of shard {key}")
        _close(_gather({k: s["pre"] for k, s in shards.items()}, axes, feature_dims), ref["pre"],
               f"{where}: the pre-activations")
        _close(_gather({k: s["acts"] for k, s in shards.items()}, axes, feature_dims), ref["acts"],
               f"{where}: the activations")
        _close(_gather({k: s["recon"] for k, s in shards.items()}, axes, output_dims), ref["recon"],
               f"{where}: the reconstruction")
        _close(_gather({k: s["head_norm_weight"] for k, s in shards.items()}, axes, {"head": 0, "model": None}),
               full.head_norm_weight, f"{where}: head_norm_weight")
        grads = unshard_state({k: s["grads"] for k, s in shards.items()}, rules, list(axes), [2] * len(axes),
                              parameters=params)
        for n, p in full.named_parameters():
            _close(grads[n], p.grad, f"{where}: the gradient of {n}")


# --- shard configs (no processes) ------------------------------------------------------------------


def test_shard_config_splits_heads_and_features() -> None:
    cfg = attrs.evolve(make_config(4, act_fn="topk", top_k=3),
                       dataset_norms={f"blocks.{i}.hook_resid_post": float(i + 1) for i in range(4)},
                       normalization="dataset")
    shard = crosscoder_shard_config(cfg, {"head": 2, "model": 4}, index={"head": 1, "model": 3})
    assert isinstance(shard, CrosscoderShardConfig)
    assert shard.hook_points == ["blocks.2.hook_resid_post", "blocks.3.hook_resid_post"]
    assert shard.dataset_norms == {"blocks.2.hook_resid_post": 3.0, "blocks.3.hook_resid_post": 4.0}
    assert shard.n_features == D_SAE // 4 and shard.top_k == 3 and shard.name == "crosscoder"
    # one head per shard is allowed for a shard (not for a user config), and survives evolve
    single = crosscoder_shard_config(cfg, {"head": 4}, index={"head": 2})
    assert single.hook_points == ["blocks.2.hook_resid_post"] and single.n_features == D_SAE
    assert attrs.evolve(single, dataset_norms={}).n_heads == 1
    # without an index: the first block; data / sweep replicate the dictionary
    assert crosscoder_shard_config(cfg, {"head": 2, "data": 2}).hook_points == cfg.hook_points[:2]
    model = Crosscoder(shard)
    assert tuple(model.W_E.shape) == (2, D_MODEL, 2) and tuple(model.head_norm_weight.shape) == (2,)


@pytest.mark.parametrize("counts, match", [({"model": 3}, r"d_sae = 8 .*\[distributed\] model = 3"),
                                           ({"head": 3}, r"4 heads .*\[distributed\] head = 3")])
def test_shard_config_rejects_uneven_splits(counts, match) -> None:
    with pytest.raises(ShardingError, match=match):
        crosscoder_shard_config(make_config(4), counts)


def test_rules_cover_parameters_and_per_head_buffer() -> None:
    cfg = make_config(4, act_fn="jumprelu")
    rules = CROSSCODER_SPEC.sharding_rules(cfg)
    model = Crosscoder(cfg)
    assert {n for n, _ in model.named_parameters()} | {"head_norm_weight"} == set(rules)
    assert rules["head_norm_weight"] == {"head": 0}


# --- end to end: the core trainer on a mesh == one process ------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("sizes, act_fn, trainer", [
    ({"head": 2}, "jumprelu", {"sparsity_coefficient": 0.01, "lp_coefficient": 0.001}),
    ({"model": 2}, "batchtopk", {"auxk_coefficient": 0.03, "dead_threshold_tokens": 8}),
    ({"data": 2}, "batchtopk", {"sparsity_coefficient": 0.01}),
    ({"head": 2, "model": 2}, "topk", {"auxk_coefficient": 0.03, "dead_threshold_tokens": 8}),
], ids=["head2-jumprelu", "model2-batchtopk-auxk", "data2-batchtopk", "head2-model2-topk"])
def test_training_on_a_mesh_matches_one_process(tmp_path, sizes, act_fn, trainer) -> None:
    from lmsae.testing.distributed import check_parallel_training

    config = {"hook_points": [f"blocks.{i}.hook_resid_post" for i in range(4)], "d_model": 6, "d_sae": 16,
              "act_fn": act_fn, "top_k": 3, "decoder_norm_gating": True, "jumprelu_init_threshold": 0.1,
              "jumprelu_bandwidth": 1.0}
    check_parallel_training("crosscoder", config, sizes, tmp_path, trainer=trainer)


if __name__ == "__main__":
    worker(sys.argv[1])
