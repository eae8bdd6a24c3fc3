"""The architecture contract: one test class a plugin subclasses in one line.

Example (the whole test file of a plugin)::

    from lmsae.testing import ArchitectureContract

    class TestMyArch(ArchitectureContract):
        architecture = "myarch"

The plugin must be installed (found through its entry point); a test that wants to register a
module directly sets ``plugins = ("my_package.plugin",)`` instead. Override :meth:`configs` to
run every check on several configs (e.g. each activation function). Skipping a check needs an
explicit ``pytest.mark.xfail(reason=...)`` on an override, never a silent skip.
"""

from __future__ import annotations

import json
import pathlib
import tomllib
from typing import ClassVar

import attrs
import pytest
import torch

from lmsae.config.base import DictionaryConfig
from lmsae.config.files import dumps_toml
from lmsae.dictionary.base import SparseDictionary
from lmsae.dictionary.io import load_dictionary, save_dictionary
from lmsae.errors import ConfigError
from lmsae.records import ArchitectureSpec
from lmsae.registry import Registry, load_registry

MESH_AXES = ("data", "model", "head", "sweep")


def check(condition: object, message: object) -> None:
    """Fail the current test with ``message`` unless ``condition`` holds (a readable failure
    without relying on pytest's assertion rewriting, which does not apply to installed packages)."""
    if not condition:
        pytest.fail(str(message), pytrace=False)


class ArchitectureContract:
    """Checks every architecture must pass. Set ``architecture`` in the subclass."""

    #: the architecture's registered name
    architecture: ClassVar[str] = ""
    #: plugin modules to register explicitly (when the package is not installed)
    plugins: ClassVar[tuple[str, ...]] = ()
    #: absolute tolerance of the float64 equality checks
    atol: ClassVar[float] = 1e-9
    #: tokens (or sequences) per test batch
    batch_size: ClassVar[int] = 8

    # --- fixtures / overridable helpers ------------------------------------------------------

    @pytest.fixture
    def registry(self) -> Registry:
        return load_registry(plugins=self.plugins, strict=True)

    @pytest.fixture
    def spec(self, registry: Registry) -> ArchitectureSpec:
        if not self.architecture:
            raise TypeError(f"{type(self).__name__} must set `architecture = \"<name>\"`")
        return registry.architecture(self.architecture)

    def configs(self, spec: ArchitectureSpec) -> list[DictionaryConfig]:
        """Configs every check runs on (default: the spec's example config)."""
        return [spec.example_config()]

    def build(self, spec: ArchitectureSpec, config: DictionaryConfig, seed: int = 0) -> SparseDictionary:
        """A float64 model with every parameter randomised (biases non-zero too).

        A config with dataset-wise normalisation but no norms gets random norms, as if estimated.
        """
        g = torch.Generator().manual_seed(seed)
        if config.normalization == "dataset" and not config.dataset_norms:
            norms = {h: float(torch.empty(()).uniform_(0.5, 20.0, generator=g)) for h in config.hook_points}
            config = attrs.evolve(config, dataset_norms=norms)
        model = spec.model_class(config)
        model.reset_parameters(generator=g)
        model.double()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        return model

    def batch(self, model: SparseDictionary, seed: int = 1) -> dict[str, torch.Tensor]:
        return model.example_batch(self.batch_size, generator=torch.Generator().manual_seed(seed))

    def parameters_allowed_without_gradient(self, config: DictionaryConfig) -> set[str]:
        """Parameters that may legitimately get no gradient from one random batch (override)."""
        return set()

    # --- checks ------------------------------------------------------------------------------

    def test_spec_is_consistent(self, spec: ArchitectureSpec) -> None:
        check(spec.name == self.architecture, 'spec.name == self.architecture')
        check(issubclass(spec.model_class, SparseDictionary), 'issubclass(spec.model_class, SparseDictionary)')
        check(isinstance(spec.example_config(), spec.config_class), 'isinstance(spec.example_config(), spec.config_class)')

    def test_config_round_trip(self, spec: ArchitectureSpec, registry: Registry) -> None:
        for cfg in self.configs(spec):
            data = registry.unstructure(cfg)
            check(data["architecture"] == self.architecture, 'data["architecture"] == self.architecture')
            check(registry.structure(json.loads(json.dumps(data)), DictionaryConfig) == cfg,
                  f"config does not survive a JSON round trip: {data}")
            check(registry.structure(tomllib.loads(dumps_toml(data)), DictionaryConfig) == cfg,
                  f"config does not survive a TOML round trip: {data}")

    def test_unknown_key_rejected(self, spec: ArchitectureSpec, registry: Registry) -> None:
        data = registry.unstructure(spec.example_config())
        data["definitely_not_a_key"] = 1
        with pytest.raises(ConfigError) as info:
            registry.structure(data, DictionaryConfig)
        check(any(p.startswith("$.definitely_not_a_key: unknown key") for p in info.value.problems),
              f"unknown key not reported at its path: {info.value.problems}")

    def test_example_config_builds(self, spec: ArchitectureSpec) -> None:
        for cfg in self.configs(spec):
            model = spec.model_class(cfg)
            check(isinstance(model, SparseDictionary), 'isinstance(model, SparseDictionary)')
            check(model.parameter_count() > 0, 'model.parameter_count() > 0')
            check(set(model.hook_dims()) == set(cfg.hook_points), 'set(model.hook_dims()) == set(cfg.hook_points)')

    def test_forward_shapes(self, spec: ArchitectureSpec) -> None:
        for cfg in self.configs(spec):
            model = self.build(spec, cfg)
            batch = self.batch(model)
            x, extras = model.prepare_input(batch)
            label = model.prepare_label(batch)
            acts = model.encode(x, mask=batch["mask"], **extras)
            lead = batch["mask"].shape
            check(acts.ndim == len(model.feature_axes(x)), 'acts.ndim == len(model.feature_axes(x))')
            check(tuple(acts.shape[: len(lead)]) == tuple(lead), 'tuple(acts.shape[: len(lead)]) == tuple(lead)')
            check(tuple(acts.shape[len(lead):]) == tuple(model.decoder_norm().shape), 'tuple(acts.shape[len(lead):]) == tuple(model.decoder_norm().shape)')
            recon = model.decode(acts, **extras)
            check(recon.shape == label.shape, f"reconstruction {tuple(recon.shape)} != label {tuple(label.shape)}")
            check(model.forward(x, mask=batch["mask"], **extras).shape == label.shape, 'model.forward(x, mask=batch["mask"], **extras).shape == label.shape')
            check(model.forward_raw(batch).shape == label.shape, 'model.forward_raw(batch).shape == label.shape')

    def test_every_parameter_receives_gradient(self, spec: ArchitectureSpec) -> None:
        for cfg in self.configs(spec):
            model = self.build(spec, cfg)
            batch = self.batch(model)
            x, extras = model.prepare_input(batch)
            acts = model.encode(x, mask=batch["mask"], **extras)
            recon = model.decode(acts, **extras)
            loss = (recon - model.prepare_label(batch)).pow(2).sum() + acts.sum()
            loss.backward()
            allowed = self.parameters_allowed_without_gradient(cfg)
            lacking = [n for n, p in model.named_parameters()
                       if n not in allowed and (p.grad is None or not bool(p.grad.abs().sum() > 0))]
            check(not lacking, f"parameters without gradient for {cfg}: {lacking}")

    def test_save_load_round_trip(self, spec: ArchitectureSpec, registry: Registry, tmp_path: pathlib.Path) -> None:
        for i, cfg in enumerate(self.configs(spec)):
            model = self.build(spec, cfg).float()
            target = tmp_path / f"dict{i}"
            save_dictionary(model, target, registry)
            loaded = load_dictionary(target, registry)
            check(type(loaded) is type(model), 'type(loaded) is type(model)')
            check(loaded.config == model.config, 'loaded.config == model.config')
            a, b = model.state_dict(), loaded.state_dict()
            check(a.keys() == b.keys(), 'a.keys() == b.keys()')
            for k in a:
                check(torch.equal(a[k], b[k]), k)
            batch = {k: v.float() if v.is_floating_point() else v for k, v in self.batch(model).items()}
            torch.testing.assert_close(loaded.forward_raw(batch), model.forward_raw(batch), rtol=0, atol=0)

    def test_sharding_rules_cover_exactly_the_parameters(self, spec: ArchitectureSpec) -> None:
        """Every parameter has a rule; a rule names a parameter or a buffer (per-feature or per-head
        buffers are sharded like parameters; buffers without a rule are replicated)."""
        for cfg in self.configs(spec):
            model = spec.model_class(cfg)
            rules = spec.sharding_rules(cfg)
            params = dict(model.named_parameters())
            entries = dict(model.state_dict())
            check(set(params) <= set(rules), f"parameters without rule: {sorted(set(params) - set(rules))}")
            check(set(rules) <= set(entries), f"rules without parameter or buffer: {sorted(set(rules) - set(entries))}")
            for name, rule in rules.items():
                for axis, dim in rule.items():
                    check(axis in MESH_AXES, f"{name}: unknown mesh axis {axis!r}")
                    check(-entries[name].ndim <= dim < entries[name].ndim, f"{name}: dim {dim} out of range")

    def test_shards_are_models_of_the_shard_config(self, spec: ArchitectureSpec) -> None:
        """For each axis the rules split, 2 shards: ``model_class(shard_config(config, {axis: 2}))``
        has exactly the sliced state's shapes, and the shards reassemble the state exactly."""
        if spec.shard_config is None:
            return
        from lmsae.distributed.models import shard_config_for
        from lmsae.distributed.sharding import shard_state, unshard_state
        from lmsae.errors import ShardingError

        for cfg in self.configs(spec):
            model = self.build(spec, cfg)
            rules = spec.sharding_rules(cfg)
            params = {n for n, _ in model.named_parameters()}
            axes = sorted({a for rule in rules.values() for a in rule})
            for axis in axes:
                shards = {}
                for i in range(2):
                    layout = {axis: (i, 2)}
                    try:
                        shard_cfg = shard_config_for(spec, cfg, layout)
                    except ShardingError:
                        continue  # e.g. an odd number of heads in this config
                    state = shard_state(model.state_dict(), rules, layout, parameters=params)
                    shard = spec.model_class(shard_cfg)
                    own = shard.state_dict()
                    for name, value in state.items():
                        check(name in own and own[name].shape == value.shape,
                              f"{axis} shard {i}: {name} has shape {tuple(value.shape)} after slicing but "
                              f"{tuple(own[name].shape) if name in own else 'is missing'} in the shard config's model")
                    shard.load_state_dict(state)
                    shards[(i,)] = state
                if len(shards) == 2:
                    back = unshard_state(shards, rules, [axis], [2], parameters=params)
                    for name, value in model.state_dict().items():
                        torch.testing.assert_close(back[name], value, rtol=0, atol=0)

    def test_folding_is_exact(self, spec: ArchitectureSpec) -> None:
        for cfg in self.configs(spec):
            g = torch.Generator().manual_seed(3)
            norms = {h: float(torch.empty(()).uniform_(0.5, 20.0, generator=g)) for h in cfg.hook_points}
            cfg_norm = attrs.evolve(cfg, normalization="dataset", dataset_norms=norms)
            model = self.build(spec, cfg_norm)
            batch = self.batch(model)
            reference = model.forward_raw(batch)
            x, extras = model.prepare_input(model.normalize(batch))
            acts_before = model.encode(x, mask=batch["mask"], **extras)
            model.fold_normalization()
            check(model.config.normalization == "none", 'model.config.normalization == "none"')
            folded = model.forward_raw(batch)
            torch.testing.assert_close(folded, reference, rtol=1e-9, atol=self.atol * max(1.0, _scale(reference)))
            x, extras = model.prepare_input(batch)
            acts_after = model.encode(x, mask=batch["mask"], **extras)
            # the same features fire (selection and thresholds survive folding)
            check(torch.equal(acts_after > 0, acts_before > 0), "folding changed which features fire")

    def test_decoder_norm_matches_feature_dims(self, spec: ArchitectureSpec) -> None:
        for cfg in self.configs(spec):
            model = spec.model_class(cfg)
            norm = model.decoder_norm()
            check(len(norm.shape) == len(model.feature_dims), 'len(norm.shape) == len(model.feature_dims)')
            check(norm.shape[-1] == cfg.n_features, 'norm.shape[-1] == cfg.n_features')
            check(bool((norm >= 0).all()), 'bool((norm >= 0).all())')


def _scale(t: torch.Tensor) -> float:
    return float(t.detach().abs().max()) if t.numel() else 1.0
