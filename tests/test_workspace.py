"""Workspace meta-tests: the rules of the monorepo, checked rather than hoped for."""

from __future__ import annotations

import ast
import inspect
import os
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

from lmsae import hookspecs

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = sorted(p for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").exists())
PLUGIN_PACKAGES = [p for p in PACKAGES if p.name != "lmsae-core"]
HOOKS = sorted(n for n in dir(hookspecs) if n.startswith("lmsae_"))


def test_hooks_exist():
    assert "lmsae_register_architectures" in HOOKS and "lmsae_after_step" in HOOKS


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hookspec_is_documented_with_an_example(hook):
    doc = inspect.getdoc(getattr(hookspecs, hook)) or ""
    assert len(doc) > 40 and "Example" in doc and "@hookimpl" in doc, f"{hook} needs a docstring with an example"


def _test_sources() -> str:
    files = list((ROOT / "tests").rglob("test_*.py")) + [f for p in PACKAGES for f in (p / "tests").rglob("test_*.py")]
    return "\n".join(f.read_text() for f in files)


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hookspec_is_exercised_by_a_test(hook):
    # a test must implement or call the hook (registration hooks are exercised by any plugin test
    # that registers through them; behaviour hooks must be called or implemented in a test)
    sources = _test_sources()
    assert re.search(rf"\b{hook}\b", sources) or _implemented_by_a_tested_plugin(hook), \
        f"no test implements or calls {hook}"


def _implemented_by_a_tested_plugin(hook: str) -> bool:
    plugin_dirs = [ROOT / "tests" / "thirdparty_plugin" / "src", ROOT / "packages" / "lmsae-core" / "src"]
    plugin_dirs += [p / "src" for p in PLUGIN_PACKAGES]
    for d in plugin_dirs:
        for f in d.rglob("*.py"):
            if re.search(rf"^def {hook}\(", f.read_text(), re.M) and "hookimpl" in f.read_text():
                return True
    return False


@pytest.mark.parametrize("package", PLUGIN_PACKAGES, ids=lambda p: p.name)
def test_plugin_package_declares_entry_point_and_contract_test(package):
    meta = tomllib.loads((package / "pyproject.toml").read_text())
    eps = meta["project"].get("entry-points", {}).get("lmsae", {})
    assert eps, f"{package.name} declares no [project.entry-points.lmsae]"
    tests = "\n".join(f.read_text() for f in (package / "tests").rglob("test_*.py"))
    assert re.search(r"class \w+\(ArchitectureContract\)", tests), f"{package.name} has no contract test"
    deps = " ".join(meta["project"].get("dependencies", []))
    assert "lmsae-core" in deps


def _imported_top_levels(src_dir: pathlib.Path) -> set[str]:
    names: set[str] = set()
    for f in src_dir.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def _plugin_import_names() -> set[str]:
    return {p.name.replace("lmsae-", "lmsae_") for p in PLUGIN_PACKAGES} | {"lmsae_example_plugin"}


def test_core_never_imports_a_plugin():
    imported = _imported_top_levels(ROOT / "packages" / "lmsae-core" / "src")
    assert not imported & _plugin_import_names()


@pytest.mark.parametrize("package", PLUGIN_PACKAGES, ids=lambda p: p.name)
def test_plugin_imports_only_itself_and_the_core_among_lmsae_packages(package):
    own = package.name.replace("-", "_")
    imported = _imported_top_levels(package / "src") | _imported_top_levels(package / "tests")
    others = (_plugin_import_names() - {own}) & imported
    assert not others, f"{package.name} imports other plugins: {sorted(others)}"


@pytest.mark.parametrize("package", PLUGIN_PACKAGES, ids=lambda p: p.name)
def test_plugin_tests_pass_with_only_core_and_itself_enabled(package):
    # Every other plugin's entry point is disabled, so the registry holds exactly core + this package.
    own_eps = set(tomllib.loads((package / "pyproject.toml").read_text())["project"]["entry-points"]["lmsae"])
    others = set()
    for p in PLUGIN_PACKAGES:
        if p != package:
            others |= set(tomllib.loads((p / "pyproject.toml").read_text())["project"]["entry-points"]["lmsae"])
    others |= {"example"}
    env = {**os.environ, "LMSAE_DISABLE_PLUGINS": ",".join(sorted(others - own_eps))}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:randomly", str(package / "tests")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]


def test_no_unused_imports_or_undefined_names():
    # pyflakes-level errors only (unused imports, undefined names, syntax): cheap and never noise
    res = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "F,E9", "--no-cache", "packages", "tests"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-4000:]
