"""Everything this plugin adds to lmsae, written only against lmsae's public API."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import click
import torch
from torch import Tensor, nn

from lmsae.config import DictionaryConfig, config_class, option
from lmsae.config.fields import positive
from lmsae.dictionary import SparseDictionary
from lmsae.hookspecs import hookimpl
from lmsae.records import ArchitectureSpec


@config_class
class TiedConfig(DictionaryConfig):
    """A ReLU SAE whose decoder is the transpose of its encoder, with a per-feature gain."""

    name: ClassVar[str] = "tied"

    hook_point: str = option(doc="Hook point read and reconstructed.")
    d_model: int = option(doc="Width of the activations.", validator=positive())
    expansion_factor: int = option(4, doc="Features per activation dimension.", validator=positive())

    @property
    def hooks_in(self) -> tuple[str, ...]:
        return (self.hook_point,)

    @property
    def hooks_out(self) -> tuple[str, ...]:
        return (self.hook_point,)

    @property
    def n_features(self) -> int:
        return self.d_model * self.expansion_factor


class TiedSAE(SparseDictionary):
    """f = relu((x - b) W + c); x_hat = (g * f) W^T + b."""

    def __init__(self, config: TiedConfig):
        super().__init__(config)
        self.W = nn.Parameter(torch.empty(config.d_model, config.n_features))
        self.gain = nn.Parameter(torch.ones(config.n_features))
        self.b_enc = nn.Parameter(torch.zeros(config.n_features))
        self.b_dec = nn.Parameter(torch.zeros(config.d_model))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            self.W.copy_(torch.randn(self.W.shape, generator=generator) / math.sqrt(self.config.d_model))
            self.gain.fill_(1.0)
            self.b_enc.zero_()
            self.b_dec.zero_()

    def encode_pre(self, x: Tensor, **_: object) -> Tensor:
        return (x - self.b_dec) @ self.W + self.b_enc

    def activate(self, hidden_pre: Tensor, mask: Tensor | None = None) -> Tensor:
        return torch.relu(hidden_pre)

    def decode(self, feature_acts: Tensor, **_: object) -> Tensor:
        return (feature_acts * self.gain) @ self.W.T + self.b_dec

    def decoder_norm(self) -> Tensor:
        return self.W.norm(dim=0) * self.gain.abs()

    def hook_dims(self) -> dict[str, int]:
        return {self.config.hook_point: self.config.d_model}

    def fold_scales(self, scales_in: Mapping[str, float], scales_out: Mapping[str, float]) -> None:
        (s,) = scales_in.values()
        (t,) = scales_out.values()
        # encoder: ((s x) - b) W + c = (x - b/s) (s W) + c ; decoder must give (g f (sW)^T + b')/t ...
        # with W' = s W the decoder term becomes g f W'^T = s g f W^T, so g' = g / (s t), b' = b / t
        # and the encoder's b_dec must then be b/s: keep the tied bias honest by re-centring via b_enc.
        b = self.b_dec.clone()
        self.W.mul_(s)
        self.gain.div_(s * t)
        # encoder input shift: (x - b'/...) — we want (x - b/s) W' ; with b_dec' = b/t we get
        # (x - b/t) W' = (x - b/s) W' + (b/s - b/t) W'; absorb the difference into b_enc.
        self.b_dec.copy_(b / t)
        self.b_enc.add_((b / s - b / t) @ self.W)


def tied_rules(config: TiedConfig) -> dict[str, dict[str, int]]:
    return {"W": {"model": 1}, "gain": {"model": 0}, "b_enc": {"model": 0}, "b_dec": {}}


def tied_example() -> TiedConfig:
    return TiedConfig(hook_point="blocks.0.hook_resid_post", d_model=16, expansion_factor=4)


@hookimpl
def lmsae_register_architectures():
    return [ArchitectureSpec(config_class=TiedConfig, model_class=TiedSAE, sharding_rules=tied_rules,
                             example_config=tied_example, summary="tied-weights ReLU SAE (third-party example)")]


@hookimpl
def lmsae_register_commands(cli: click.Group) -> None:
    @cli.command("tied-info")
    @click.option("--d-model", type=int, default=16, show_default=True)
    @click.option("--expansion-factor", type=int, default=4, show_default=True)
    def tied_info(d_model: int, expansion_factor: int) -> None:
        """Print the parameter count of a tied SAE (added by lmsae-example-plugin)."""
        model = TiedSAE(TiedConfig(hook_point="x", d_model=d_model, expansion_factor=expansion_factor))
        click.echo(f"tied SAE: {model.n_features} features, {model.parameter_count()} parameters")
