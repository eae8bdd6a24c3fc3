"""A deliberately small architecture used by the core's own tests.

It is a plain ReLU dictionary with an optional separate output hook, written against the
public contract only, like a third-party plugin would be. It is not registered by default:
tests add it with ``load_registry(plugins=["lmsae.testing.toy"])``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor, nn

from lmsae.config import DictionaryConfig, config_class, option
from lmsae.config.fields import positive
from lmsae.dictionary.base import SparseDictionary
from lmsae.hookspecs import hookimpl
from lmsae.records import ArchitectureSpec


@config_class
class ToyConfig(DictionaryConfig):
    """A ReLU dictionary for tests."""

    name: ClassVar[str] = "toy"

    hook_point: str = option(doc="Hook point read (and predicted unless hook_point_out is set).")
    hook_point_out: str | None = option(None, doc="Hook point predicted (a transcoder when set).")
    d_model: int = option(doc="Width of the activations.", validator=positive())
    n_latents: int = option(doc="Number of features.", validator=positive())

    @property
    def hooks_in(self) -> tuple[str, ...]:
        return (self.hook_point,)

    @property
    def hooks_out(self) -> tuple[str, ...]:
        return (self.hook_point_out or self.hook_point,)

    @property
    def n_features(self) -> int:
        return self.n_latents


class ToyDictionary(SparseDictionary):
    def __init__(self, config: ToyConfig):
        super().__init__(config)
        d, f = config.d_model, config.n_latents
        self.W_E = nn.Parameter(torch.empty(d, f))
        self.b_E = nn.Parameter(torch.empty(f))
        self.W_D = nn.Parameter(torch.empty(f, d))
        self.b_D = nn.Parameter(torch.empty(d))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        d, f = self.config.d_model, self.config.n_latents
        with torch.no_grad():
            self.W_D.copy_(torch.randn(f, d, generator=generator) / math.sqrt(d))
            self.W_E.copy_(self.W_D.T)
            self.b_E.zero_()
            self.b_D.zero_()

    def encode_pre(self, x: Tensor, **_: object) -> Tensor:
        return x @ self.W_E + self.b_E

    def activate(self, hidden_pre: Tensor, mask: Tensor | None = None) -> Tensor:
        return torch.relu(hidden_pre)

    def decode(self, feature_acts: Tensor, **_: object) -> Tensor:
        return feature_acts @ self.W_D + self.b_D

    def decoder_norm(self) -> Tensor:
        return self.W_D.norm(dim=-1)

    def hook_dims(self) -> dict[str, int]:
        return {h: self.config.d_model for h in self.config.hook_points}

    def fold_scales(self, scales_in: Mapping[str, float], scales_out: Mapping[str, float]) -> None:
        (s_in,) = scales_in.values()
        (s_out,) = scales_out.values()
        # h = (s_in x) W_E + b_E  ->  x (s_in W_E) + b_E; ReLU commutes with the unchanged scale.
        self.W_E.mul_(s_in)
        # y_raw = (f W_D + b_D) / s_out
        self.W_D.div_(s_out)
        self.b_D.div_(s_out)


def toy_sharding_rules(config: ToyConfig) -> dict[str, dict[str, int]]:
    return {"W_E": {"model": 1}, "b_E": {"model": 0}, "W_D": {"model": 0}, "b_D": {}}


def toy_example() -> ToyConfig:
    return ToyConfig(hook_point="blocks.0.hook_resid_post", d_model=16, n_latents=64)


@hookimpl
def lmsae_register_architectures():
    return [ArchitectureSpec(config_class=ToyConfig, model_class=ToyDictionary,
                             sharding_rules=toy_sharding_rules, example_config=toy_example,
                             summary="ReLU dictionary for the core's tests")]
