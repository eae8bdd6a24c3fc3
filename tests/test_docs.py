"""The documentation cannot rot: the generated configuration reference is current."""

from __future__ import annotations

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
DISTRIBUTIONS = ("lmsae-core", "lmsae-crosscoder", "lmsae-clt", "lmsae-lorsa", "lmsae-molt")
COMMAND = "lmsae config reference " + " ".join(f"--distribution {d}" for d in DISTRIBUTIONS) + " > docs/reference.md"


def test_configuration_reference_is_current():
    from lmsae.config.reference import render_reference
    from lmsae.registry import load_registry

    expected = render_reference(load_registry().restricted(set(DISTRIBUTIONS)))
    committed = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")
    assert committed == expected, f"docs/reference.md is out of date: regenerate it with `{COMMAND}`"


def test_reference_documents_every_component_and_field():
    import attrs

    from lmsae.registry import load_registry

    text = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")
    registry = load_registry().restricted(set(DISTRIBUTIONS))
    for entry in registry.entries():
        spec = entry.spec
        if not hasattr(spec, "config_class"):
            continue
        assert f"`{entry.name}`" in text, entry.name
        for field in attrs.fields(spec.config_class):
            if field.name != "name" and not field.name.startswith("_"):
                assert f"| `{field.name}` |" in text, f"{entry.kind} {entry.name}: {field.name}"
