"""lmsae.testing.distributed: the parallel-training check finds plugins that are not installed."""

from __future__ import annotations

import types

import pytest

from lmsae.errors import UnknownNameError
from lmsae.testing import toy
from lmsae.testing.distributed import _plugin_paths, check_parallel_training


def test_plugin_modules_travel_to_the_workers_as_import_paths():
    assert _plugin_paths(["lmsae.testing.toy", toy]) == ("lmsae.testing.toy", "lmsae.testing.toy")


def test_a_module_built_at_run_time_is_refused_with_its_name():
    with pytest.raises(ValueError, match="plugin module 'made_up'.*cannot be imported by name"):
        _plugin_paths([types.ModuleType("made_up")])


def test_an_architecture_that_is_not_installed_fails_before_spawning(tmp_path):
    with pytest.raises(UnknownNameError, match="unknown architecture 'toy'"):
        check_parallel_training("toy", toy.toy_example(), {"data": 2}, tmp_path)
    assert not (tmp_path / "errors").exists()


@pytest.mark.slow
def test_data_parallel_training_of_an_uninstalled_plugin_matches_one_process(tmp_path):
    # lmsae.testing.toy has no entry point: only plugins= makes its architecture known, in this
    # process and in the two spawned workers
    result = check_parallel_training("toy", toy.toy_example(), {"data": 2}, tmp_path, steps=2,
                                     plugins=[toy])
    assert result["single"]["metrics/mse"] == pytest.approx(result["distributed"]["metrics/mse"])
