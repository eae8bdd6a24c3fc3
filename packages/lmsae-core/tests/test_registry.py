"""Plugin discovery and the registry: provenance, clashes, misspelt hooks, broken plugins."""

from __future__ import annotations

import pytest

from lmsae.errors import DuplicateNameError, PluginError, UnknownNameError
from lmsae.hookspecs import hookimpl
from lmsae.records import SourceSpec
from lmsae.registry import load_registry

from lmsae.testing.plugins import FakeEntryPoint, arch_spec, fake_entry_points, module


def arch_plugin(name: str, tag: str):
    @hookimpl
    def lmsae_register_architectures():
        return [arch_spec(tag)]

    return module(name, lmsae_register_architectures=lmsae_register_architectures)


def test_core_builtins_are_registered_with_their_distribution(monkeypatch):
    fake_entry_points(monkeypatch, [])
    reg = load_registry()
    entry = reg.entry("task", "init")
    assert entry.distribution == "lmsae-core"
    assert entry.plugin == "core"
    assert reg.failures == []


def test_entry_point_plugin_is_discovered_with_distribution_and_version(monkeypatch):
    fake_entry_points(monkeypatch, [FakeEntryPoint("alpha", lambda: arch_plugin("alpha_mod", "alpha-arch"),
                                                   "alpha-pkg", "2.3")])
    reg = load_registry()
    entry = reg.entry("architecture", "alpha-arch")
    assert (entry.distribution, entry.version, entry.plugin) == ("alpha-pkg", "2.3", "alpha")
    assert "alpha-arch" in reg.names("architecture")


def test_duplicate_name_names_both_distributions(monkeypatch):
    fake_entry_points(monkeypatch, [
        FakeEntryPoint("one", lambda: arch_plugin("one_mod", "same"), "first-pkg"),
        FakeEntryPoint("two", lambda: arch_plugin("two_mod", "same"), "second-pkg"),
    ])
    with pytest.raises(DuplicateNameError) as info:
        load_registry()
    msg = str(info.value)
    assert "architecture 'same'" in msg and "first-pkg" in msg and "second-pkg" in msg


def test_misspelt_marked_hook_is_rejected(monkeypatch):
    @hookimpl
    def lmsae_register_architecture():  # missing final "s"
        return []

    bad = module("bad_mod", lmsae_register_architecture=lmsae_register_architecture)
    fake_entry_points(monkeypatch, [FakeEntryPoint("bad", lambda: bad, "bad-pkg")])
    reg = load_registry()
    (failure,) = reg.failures
    assert failure.distribution == "bad-pkg"
    assert "lmsae_register_architecture" in failure.error
    assert "did you mean 'lmsae_register_architectures'" in failure.error
    with pytest.raises(PluginError, match="bad-pkg"):
        load_registry(strict=True)


def test_misspelt_unmarked_hook_is_rejected(monkeypatch):
    bad = module("bad2", lmsae_after_stepp=lambda trainer, dictionary, step, metrics: None)
    fake_entry_points(monkeypatch, [FakeEntryPoint("bad2", lambda: bad, "bad2-pkg")])
    reg = load_registry()
    assert "lmsae_after_stepp" in reg.failures[0].error and "lmsae_after_step" in reg.failures[0].error
    assert "bad2" not in reg.plugins


def test_plugin_that_fails_to_import_is_reported_with_its_package(monkeypatch):
    def boom():
        raise ImportError("No module named 'missing_dependency'")

    fake_entry_points(monkeypatch, [FakeEntryPoint("broken", boom, "broken-pkg"),
                                    FakeEntryPoint("alpha", lambda: arch_plugin("alpha_mod", "alpha-arch"),
                                                   "alpha-pkg")])
    reg = load_registry()
    (failure,) = reg.failures
    assert failure.plugin == "broken" and failure.distribution == "broken-pkg"
    assert "missing_dependency" in str(failure)
    assert "alpha-arch" in reg.names("architecture")  # the others still load


def test_record_of_wrong_type_is_rejected(monkeypatch):
    @hookimpl
    def lmsae_register_sources():
        return [arch_spec("not-a-source")]

    fake_entry_points(monkeypatch, [FakeEntryPoint("wrong", lambda: module("w", lmsae_register_sources=lmsae_register_sources),
                                                   "wrong-pkg")])
    reg = load_registry()
    assert "expected SourceSpec" in reg.failures[0].error


def test_config_class_of_wrong_kind_is_rejected(monkeypatch):
    spec = arch_spec("x")

    @hookimpl
    def lmsae_register_sources():
        return [SourceSpec(config_class=spec.config_class, factory=lambda c, ctx: iter(()))]

    fake_entry_points(monkeypatch, [FakeEntryPoint("w2", lambda: module("w2", lmsae_register_sources=lmsae_register_sources),
                                                   "w2-pkg")])
    reg = load_registry()
    assert "subclass of SourceConfig" in reg.failures[0].error


def test_disable_env_var_skips_named_plugins(monkeypatch):
    fake_entry_points(monkeypatch, [FakeEntryPoint("alpha", lambda: arch_plugin("alpha_mod", "alpha-arch"), "alpha-pkg"),
                                    FakeEntryPoint("beta", lambda: arch_plugin("beta_mod", "beta-arch"), "beta-pkg")])
    monkeypatch.setenv("LMSAE_DISABLE_PLUGINS", "alpha, gamma")
    names = load_registry().names("architecture")
    assert "beta-arch" in names and "alpha-arch" not in names
    monkeypatch.setenv("LMSAE_DISABLE_PLUGINS", "all")
    assert load_registry().names("architecture") == ["sae"]  # only the core's own
    assert load_registry().names("task")  # the core's built-ins are never disabled


def test_unknown_name_lists_choices_and_closest(monkeypatch):
    fake_entry_points(monkeypatch, [])
    reg = load_registry(plugins=["lmsae.testing.toy"])
    with pytest.raises(UnknownNameError) as info:
        reg.architecture("tyo")
    assert "installed architectures:" in str(info.value) and "did you mean 'toy'" in str(info.value)


def test_explicit_plugins_report_local_distribution(monkeypatch):
    fake_entry_points(monkeypatch, [])
    reg = load_registry(plugins=["lmsae.testing.toy"])
    assert reg.entry("architecture", "toy").distribution == "local"


def test_behaviour_hooks_call_every_implementation(monkeypatch):
    calls = []

    @hookimpl
    def lmsae_after_step(trainer, dictionary, step, metrics):
        calls.append(("a", step))

    @hookimpl
    def lmsae_after_training(trainer, dictionary, result):
        calls.append(("end", result))

    fake_entry_points(monkeypatch, [])
    reg = load_registry(plugins=[module("hooks_a", lmsae_after_step=lmsae_after_step,
                                        lmsae_after_training=lmsae_after_training)])
    reg.hook.lmsae_after_step(trainer=None, dictionary=None, step=3, metrics=None)
    reg.hook.lmsae_after_training(trainer=None, dictionary=None, result="done")
    assert calls == [("a", 3), ("end", "done")]


def test_unmarked_behaviour_hooks_are_called_like_unmarked_registration_hooks(monkeypatch):
    calls = []

    def lmsae_register_architectures():  # no @hookimpl: found by name
        return [arch_spec("unmarked-arch")]

    def lmsae_before_training(trainer, dictionary):  # no @hookimpl either
        calls.append("before")

    def lmsae_after_step(trainer, step):  # a subset of the parameters, as pluggy allows
        calls.append(("step", step))

    fake_entry_points(monkeypatch, [])
    reg = load_registry(plugins=[module("unmarked", lmsae_register_architectures=lmsae_register_architectures,
                                        lmsae_before_training=lmsae_before_training,
                                        lmsae_after_step=lmsae_after_step)])
    assert "unmarked-arch" in reg.names("architecture")
    reg.hook.lmsae_before_training(trainer=None, dictionary=None)
    reg.hook.lmsae_after_step(trainer=None, dictionary=None, step=2, metrics=None)
    assert calls == ["before", ("step", 2)]


def test_unmarked_behaviour_hook_with_wrong_parameters_is_rejected(monkeypatch):
    def lmsae_after_step(trainer, stepp):
        pass

    bad = module("bad3", lmsae_after_step=lmsae_after_step)
    fake_entry_points(monkeypatch, [FakeEntryPoint("bad3", lambda: bad, "bad3-pkg")])
    reg = load_registry()
    assert "bad3" not in reg.plugins
    assert "lmsae_after_step" in reg.failures[0].error and "stepp" in reg.failures[0].error


def test_behaviour_hook_that_is_not_a_function_is_rejected_with_module_and_name(monkeypatch):
    import functools

    def after_step(trainer, dictionary, step, metrics, extra):
        pass

    bad = module("bad4", lmsae_after_step=functools.partial(after_step, extra=1))
    fake_entry_points(monkeypatch, [FakeEntryPoint("bad4", lambda: bad, "bad4-pkg")])
    reg = load_registry()
    assert "bad4" not in reg.plugins
    assert "bad4.lmsae_after_step is a partial, not a function" in reg.failures[0].error


def test_tracing_writes_hook_calls(monkeypatch, capsys):
    fake_entry_points(monkeypatch, [])
    monkeypatch.setenv("LMSAE_TRACE_HOOKS", "1")
    reg = load_registry()
    reg.hook.lmsae_before_training(trainer=None, dictionary=None)
    assert "lmsae_before_training" in capsys.readouterr().err


def test_no_global_plugin_manager(monkeypatch):
    fake_entry_points(monkeypatch, [])
    a, b = load_registry(plugins=["lmsae.testing.toy"]), load_registry()
    assert a.pm is not b.pm
    assert "toy" in a.names("architecture") and "toy" not in b.names("architecture")
