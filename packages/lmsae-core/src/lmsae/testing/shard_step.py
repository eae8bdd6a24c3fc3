"""A sharded forward/backward step of an architecture checked against one process, on gloo.

Plugin tests use it to check their feature-parallel maths on every case of a table: the test file
defines how to build a config, a model and a batch, hands them to :class:`ShardStepCheck`, and is
also the script the launched processes run::

    CHECK = ShardStepCheck(SPEC, CASES, make_config, make_model, make_batch, feature_dim)

    @pytest.fixture(scope="module")
    def outcomes(tmp_path_factory):
        return CHECK.launch(__file__, tmp_path_factory.mktemp("distributed"))

    @pytest.mark.parametrize("layout", CHECK.layouts)
    @pytest.mark.parametrize("case", list(CASES))
    def test_sharded_step_matches_single_process(outcomes, case, layout):
        if outcomes[f"{case}/{layout}"]:
            pytest.fail(outcomes[f"{case}/{layout}"], pytrace=False)

    if __name__ == "__main__":
        CHECK.worker(sys.argv[1])

Each case builds the shard the trainer would (``shard_config`` + ``shard_state``), runs
``encode_pre``/``activate``, ``decode`` on the first model rank and ``decode_linear`` on the others,
sums the partial predictions, back-propagates a masked squared error plus a decoder-norm-weighted
L1, and compares the prediction, the local activations and every gradient (replicated ones summed
over the axes they are replicated along) with the full model in one process. Layouts: ``model``
and ``data`` on 2 processes; with ``LMSAE_TEST_DISTRIBUTED_WORLD=4`` also ``data+model``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from lmsae.testing.distributed import free_port

__all__ = ["ShardStepCheck"]


def _objective(y, acts, norm, mask, label, feature_group=None):
    """Masked squared error of the prediction + 0.1 * decoder-norm-weighted L1 of the activations
    (the L1 of a feature shard summed over the model group, as the trainer does)."""
    from lmsae.distributed.collectives import reduce_sum

    w = mask.to(y.dtype)
    err = (y - label).square().reshape(*mask.shape, -1).sum(-1)
    l1 = (acts * norm).reshape(*mask.shape, -1).sum(-1)
    return (err * w).sum() + 0.1 * reduce_sum((l1 * w).sum(), feature_group)


class ShardStepCheck:
    """See the module docstring. ``make_batch(model)`` returns ``(x, extras, mask, label)``;
    ``feature_dim(config, ndim)`` is the dim of the activations the model axis splits."""

    def __init__(self, spec: Any, cases: Mapping[str, Mapping[str, Any]], make_config: Callable[..., Any],
                 make_model: Callable[..., Any], make_batch: Callable[..., Any],
                 feature_dim: Callable[[Any, int], int], *, tol: float = 1e-10):
        self.spec, self.cases, self.tol = spec, dict(cases), tol
        self.make_config, self.make_model, self.make_batch, self.feature_dim = (make_config, make_model,
                                                                                make_batch, feature_dim)
        self.world = int(os.environ.get("LMSAE_TEST_DISTRIBUTED_WORLD", "2"))
        self.layouts = ("model", "data", "data+model") if self.world == 4 else ("model", "data")

    def run_case(self, name: str, layout: str, full_mesh: Any) -> None:
        """Check case ``name`` on ``layout`` in this process (raises AssertionError on a mismatch)."""
        from lmsae.distributed.collectives import all_reduce, reduce_sum
        from lmsae.distributed.mesh import Mesh
        from lmsae.distributed.parallel import ParallelContext, parallel
        from lmsae.distributed.sharding import rule_dim, shard_state, shard_tensor

        spec = self.spec
        cfg = self.make_config(**self.cases[name])
        full = self.make_model(cfg)
        x, extras, mask, label = self.make_batch(full)

        # the single-process reference on the whole batch
        acts_full = full.activate(full.encode_pre(x, **extras), mask)
        y_full = full.decode(acts_full, **extras)
        _objective(y_full, acts_full, full.decoder_norm(), mask, label).backward()
        grads_full = {n: p.grad.detach().clone() for n, p in full.named_parameters()}

        if layout == "data+model":
            mesh = full_mesh
        else:  # two processes of the launch (a model group, or a data group of the 4-process mesh) play the axis
            axis = "model" if full_mesh.size("data") == 1 else layout
            mesh = Mesh({layout: 2}, rank=full_mesh.coord(axis), groups={(layout,): full_mesh.group(axis)})
        m, mi = mesh.size("model"), mesh.coord("model")
        dn, di = mesh.size("data"), mesh.coord("data")
        rules = spec.sharding_rules(cfg)
        params = {n for n, _ in full.named_parameters()}
        if m > 1:
            shard = spec.model_class(spec.shard_config(cfg, {"model": m})).double()
            shard.load_state_dict(shard_state(full.state_dict(), rules, {"model": (mi, m)}, parameters=params))
        else:
            shard = self.make_model(cfg)
        n = x.shape[0]  # the data axis splits the first token axis
        rows = slice(di * n // dn, (di + 1) * n // dn)
        x_l, mask_l, label_l = x[rows], mask[rows], label[rows]
        extras_l = {k: v[rows] for k, v in extras.items()}

        ctx = ParallelContext(mesh)
        with parallel(ctx):
            acts = shard.activate(shard.encode_pre(x_l, **extras_l), mask_l)
            partial = shard.decode(acts, **extras_l) if ctx.first("model") else shard.decode_linear(acts, **extras_l)
            y = reduce_sum(partial, ctx.feature_group)
            loss = _objective(y, acts, shard.decoder_norm(), mask_l, label_l, ctx.feature_group)
        loss.backward()

        # gradients: a parameter's gradient is summed over the axes it is replicated along
        grads = {}
        for n, p in shard.named_parameters():
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            dim = rule_dim(rules, n, "model")
            axes = ("data",) if dim is not None else ("data", "model")
            grads[n] = (all_reduce(g, mesh.group(*axes)), dim)

        def close(got, want, what):
            got, want = got.detach(), want.detach()
            err = float((got - want).abs().max()) if got.numel() else 0.0
            scale = max(1.0, float(want.abs().max()) if want.numel() else 0.0)
            if not err <= self.tol * scale:
                raise AssertionError(f"{name} on {layout}: {what} differs by {err:.3g} (scale {scale:.3g})")

        close(y, y_full[rows], "the prediction")
        d = self.feature_dim(cfg, acts_full.ndim)
        close(acts, shard_tensor(acts_full[rows], d, m, mi) if m > 1 else acts_full[rows], "the activations")
        if int((acts != 0).sum()) == 0:
            raise AssertionError(f"{name} on {layout}: no active feature (the case tests nothing)")
        for n, (g, dim) in grads.items():
            want = grads_full[n]
            close(g, shard_tensor(want, dim, m, mi) if m > 1 else want, f"the gradient of {n}")

    def worker(self, out_dir: str) -> None:
        """The body of one launched process: every case on every layout; outcomes to ``rank<r>.json``."""
        from lmsae.distributed.mesh import DistributedConfig, build_mesh

        torch.set_num_threads(1)
        rank = int(os.environ["RANK"])
        sizes = {"data": 2, "model": 2} if self.world == 4 else {"model": 2}
        full_mesh = build_mesh(DistributedConfig(**sizes, timeout_s=60.0))
        outcome = {}
        for name in self.cases:
            for layout in self.layouts:
                try:
                    self.run_case(name, layout, full_mesh)
                    outcome[f"{name}/{layout}"] = None
                except Exception:
                    outcome[f"{name}/{layout}"] = traceback.format_exc()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(outcome))
        torch.distributed.destroy_process_group()

    def launch(self, script: str, out: Path) -> dict[str, str | None]:
        """Run ``python script OUT`` in ``world`` processes (the script calls :meth:`worker`); the
        outcome of every ``case/layout``: None when it passed, else the failing rank's traceback."""
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(self.world),
               "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen([sys.executable, script, str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(self.world)]
        logs = []
        try:
            for p in procs:
                logs.append(p.communicate(timeout=240)[0].decode(errors="replace"))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        merged: dict[str, str | None] = {}
        for r in range(self.world):
            path = out / f"rank{r}.json"
            if not path.exists():
                raise RuntimeError(f"distributed worker {r} wrote no result (exit codes {[p.returncode for p in procs]}):\n"
                                   + "\n".join(logs))
            for case, error in json.loads(path.read_text()).items():
                merged[case] = merged.get(case) or (f"rank {r}: {error}" if error else None)
        return merged
