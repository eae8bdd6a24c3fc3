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
        """Rewrite the weights for raw activations: ``forward(x) == forward_before(s x) / t``.

        With s = input scale, t = output scale, the old model computes
        f = relu((s x - b) W + c) and predicts (g f W^T + b) / t. Folded: W' = s W, b' = b / t,
        g' = g / (s t) keep the prediction, and the encoder, which now sees
        (x - b/t) W' = (s x - b) W + (1 - s/t) b W, needs c' = c - (1 - s/t) b W so that the
        features f are unchanged (exact also when s != t).
        """
        (s,) = (float(v) for v in scales_in.values())
        (t,) = (float(v) for v in scales_out.values())
        with torch.no_grad():
            b = self.b_dec.clone()
            self.b_enc.sub_((1.0 - s / t) * b @ self.W)  # with the old W
            self.W.mul_(s)
            self.gain.div_(s * t)
            self.b_dec.copy_(b / t)

    def init_encoder_from_decoder(self, factor: float = 1.0) -> None:
        """Encoder = decoder transpose × ``factor`` (the ``[initializer] encoder_from_decoder`` step).

        The encoder is ``W`` and the decoder ``diag(gain) W^T``: they are tied, so only the gain
        can make the encoder ``factor`` times the decoder's transpose, exactly: ``gain = 1/factor``.
        """
        with torch.no_grad():
            self.gain.fill_(1.0 / factor)


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
