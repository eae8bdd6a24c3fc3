"""Shared helpers of the CLT tests: small models with every parameter randomised, raw batches.

The helpers are handed out as fixtures (``make_config``, ``make_model``, ``raw_batch``): with
pytest's importlib import mode a test module cannot import ``conftest`` by name.
"""

from __future__ import annotations

import os

import attrs
import pytest
import torch

from lmsae_clt.config import CLTConfig
from lmsae_clt.model import CrossLayerTranscoder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def hooks(n_layers: int) -> tuple[list[str], list[str]]:
    return ([f"blocks.{i}.ln2.hook_normalized" for i in range(n_layers)],
            [f"blocks.{i}.hook_mlp_out" for i in range(n_layers)])


def _make_config(n_layers: int = 3, d_model: int = 6, d_sae: int = 5, **kw) -> CLTConfig:
    hin, hout = hooks(n_layers)
    kw.setdefault("normalization", "none")
    return CLTConfig(hook_points_in=hin, hook_points_out=hout, d_model=d_model, d_sae=d_sae, **kw)


def _make_model(config: CLTConfig | None = None, seed: int = 0, dtype=torch.float64, **kw) -> CrossLayerTranscoder:
    """A model with every parameter (biases and thresholds too) randomised."""
    config = config if config is not None else _make_config(**kw)
    if config.normalization == "dataset" and not config.dataset_norms:
        g = torch.Generator().manual_seed(seed + 100)
        config = attrs.evolve(config, dataset_norms={h: float(torch.empty(()).uniform_(0.5, 20.0, generator=g))
                                                     for h in config.hook_points})
    g = torch.Generator().manual_seed(seed)
    model = CrossLayerTranscoder(config)
    model.reset_parameters(generator=g)
    model.to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _raw_batch(model: CrossLayerTranscoder, n: int = 16, seed: int = 1, scale: float = 3.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dtype = model.W_E.dtype
    batch = {h: torch.randn(n, d, generator=g, dtype=dtype) * scale + 0.3 for h, d in model.hook_dims().items()}
    batch["mask"] = torch.ones(n, dtype=torch.bool)
    return batch


@pytest.fixture
def registry():
    from lmsae.registry import load_registry

    return load_registry(strict=True)


@pytest.fixture
def make_config():
    return _make_config


@pytest.fixture
def make_model():
    return _make_model


@pytest.fixture
def raw_batch():
    return _raw_batch


# --- a tiny multi-layer activation source, registered by tests through load_registry(plugins=[...]) ---

from typing import ClassVar

from lmsae.config.base import SourceConfig
from lmsae.config.fields import config_class, option, positive
from lmsae.hookspecs import hookimpl
from lmsae.records import SourceSpec


@config_class
class LayeredSourceConfig(SourceConfig):
    """Fake CLT data: sparse true features per layer; x_i = z_i A_i, y_j = sum_{i<=j} z_i B_ij."""

    name: ClassVar[str] = "clt_test_layers"

    n_layers: int = option(3, doc="Layers.", validator=positive())
    d_model: int = option(16, doc="Width of x and y.", validator=positive())
    n_true: int = option(24, doc="True features per layer.", validator=positive())
    mean_active: float = option(2.0, doc="Expected active true features per layer and token.", validator=positive())
    batch_size: int = option(256, doc="Tokens per chunk.", validator=positive())
    seed: int = option(0, doc="Seed of the truth and of every chunk.")
    n_chunks: int | None = option(None, doc="Chunks before the stream ends (None = endless).", validator=positive())


class LayeredSource:
    def __init__(self, config: LayeredSourceConfig, context):
        self.config = config
        self.hook_points = tuple(context.hook_points)
        g = torch.Generator().manual_seed(config.seed)
        n, d, k = config.n_layers, config.d_model, config.n_true
        unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, d, generator=g), dim=-1)
        self.A = unit(n, k)  # (L, k, d)
        # true cross-layer writes decay with distance
        self.B = {(i, j): unit(k) / (1 + j - i) for j in range(n) for i in range(j + 1)}
        self.position = 0

    def chunk(self, index: int) -> dict[str, torch.Tensor]:
        cfg = self.config
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + index + 1)
        n, k, b = cfg.n_layers, cfg.n_true, cfg.batch_size
        fire = torch.rand(b, n, k, generator=g) < cfg.mean_active / k
        z = fire * torch.rand(b, n, k, generator=g).mul(2).add(0.5)
        out = {}
        for i in range(n):
            out[f"blocks.{i}.ln2.hook_normalized"] = z[:, i] @ self.A[i]
        for j in range(n):
            out[f"blocks.{j}.hook_mlp_out"] = sum(z[:, i] @ self.B[i, j] for i in range(j + 1))
        batch = {h: out[h] for h in self.hook_points}
        batch["mask"] = torch.ones(b, dtype=torch.bool)
        batch["tokens"] = torch.zeros(b, dtype=torch.int64)
        return batch

    def __iter__(self):
        while self.config.n_chunks is None or self.position < self.config.n_chunks:
            index = self.position
            self.position += 1
            yield self.chunk(index)

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = int(state["position"])


@hookimpl
def _register_sources():
    return [SourceSpec(config_class=LayeredSourceConfig, factory=LayeredSource, summary="fake CLT test data")]


def _layered_registry():
    from lmsae.registry import load_registry
    from lmsae.testing.plugins import module

    return load_registry(plugins=[module("clt_test_source", lmsae_register_sources=_register_sources)], strict=True)


@pytest.fixture
def layered_registry():
    """The installed plugins (clt included) plus the fake multi-layer source."""
    return _layered_registry()


LAYERS = 3
IN, OUT = hooks(LAYERS)


def _train_config(out, dictionary=None, trainer=None, tokens=100 * 256, **top) -> dict:
    """A train-task config (plain data) for a 3-layer CLT on the fake multi-layer source."""
    return {
        "task": "train",
        "output_dir": str(out),
        "device": "cpu",
        "loggers": [{"type": "jsonl"}],
        "dictionary": {"architecture": "clt", "hook_points_in": IN, "hook_points_out": OUT, "d_model": 16,
                       "d_sae": 48, "act_fn": "topk", "top_k": 3, **(dictionary or {})},
        "activations": {"batch_size": 256, "sources": [{"type": "clt_test_layers", "seed": 3}]},
        "trainer": {"total_training_tokens": tokens, "lr": 1e-2, "log_every": 25, "lr_warmup_steps": 0,
                    **(trainer or {})},
        "initializer": {"encoder_from_decoder": False, "decoder_bias": "mean"},
        **top,
    }


def _run_train(registry, data):
    import io

    from lmsae.config.base import RunConfig
    from lmsae.runtime import RunContext

    cfg = registry.structure(data, RunConfig)
    return registry.get("task", "train").factory(cfg, RunContext(registry=registry, out=io.StringIO(), progress=False))


def _held_out(registry, n_chunks=4, seed=3, start=1000):
    """Raw batches of the fake source that training never reads (chunks from ``start`` on)."""
    from lmsae.activations.protocol import SourceContext

    spec = registry.get("source", "clt_test_layers")
    source = spec.factory(spec.config_class(seed=seed), SourceContext(hook_points=tuple(IN + OUT)))
    return [source.chunk(start + i) for i in range(n_chunks)]


@pytest.fixture
def train_config():
    return _train_config


@pytest.fixture
def run_train():
    return _run_train


@pytest.fixture
def held_out():
    return _held_out


@pytest.fixture(scope="session")
def trained_topk_clt(tmp_path_factory):
    """Directory of a TopK CLT (k = 3 per layer) trained once per session on the fake source (100 steps)."""
    out = tmp_path_factory.mktemp("trained_topk_clt")
    _run_train(_layered_registry(), _train_config(out, trainer={"auxk_coefficient": 0.03,
                                                               "dead_threshold_tokens": 5000}))
    return out
