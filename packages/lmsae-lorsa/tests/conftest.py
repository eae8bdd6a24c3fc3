"""Shared helpers of the Lorsa tests, handed out as fixtures (pytest's importlib mode cannot import
``conftest`` by name): small configs and models with every parameter randomised."""

from __future__ import annotations

import os

import attrs
import pytest
import torch
from lmsae_lorsa.config import LorsaConfig
from lmsae_lorsa.model import LowRankSparseAttention

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

IN, OUT = "blocks.0.ln1.hook_normalized", "blocks.0.hook_attn_out"


def _make_config(**kw) -> LorsaConfig:
    base = dict(hook_point_in=IN, hook_point_out=OUT, d_model=12, n_qk_heads=3, d_qk_head=6, d_sae=12, n_ctx=32,
                act_fn="relu", normalization="none")
    return LorsaConfig(**{**base, **kw})


def _make_model(config: LorsaConfig | None = None, seed: int = 0, dtype=torch.float64, **kw) -> LowRankSparseAttention:
    """A model with every parameter (biases, norm weights, thresholds) randomised."""
    config = config if config is not None else _make_config(**kw)
    if config.normalization == "dataset" and not config.dataset_norms:
        g = torch.Generator().manual_seed(seed + 100)
        config = attrs.evolve(config, dataset_norms={h: float(torch.empty(()).uniform_(0.5, 20.0, generator=g))
                                                     for h in config.hook_points})
    g = torch.Generator().manual_seed(seed)
    model = LowRankSparseAttention(config)
    model.reset_parameters(generator=g)
    model.to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _raw_batch(model: LowRankSparseAttention, n: int = 3, T: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dtype = model.W_Q.dtype
    batch = {h: torch.randn(n, T, d, generator=g, dtype=dtype) * 2.0 + 0.3 for h, d in model.hook_dims().items()}
    batch["mask"] = torch.ones(n, T, dtype=torch.bool)
    return batch


@pytest.fixture
def make_config():
    return _make_config


@pytest.fixture
def make_model():
    return _make_model


@pytest.fixture
def raw_batch():
    return _raw_batch


@pytest.fixture
def registry():
    from lmsae.registry import load_registry

    return load_registry(strict=True)
