import pytest
import torch

from tests import reliability_plugin
from tests.reliability_plugin import pytest_addoption  # noqa: F401  (the --reliability-out option)


def pytest_configure(config):
    reliability_plugin.configure(config)


@pytest.hookimpl(tryfirst=True)  # before -m deselects: a dist test is slow too
def pytest_collection_modifyitems(config, items):
    for item in items:
        reliability_plugin.check_marker(item)
        if item.get_closest_marker("dist") is not None and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    from tests.tinydata import write_tiny

    return write_tiny(str(tmp_path_factory.mktemp("tiny")))


# --- the fast tier (`make test-fast`, -m "not slow") spawns no process ----------------------------
# A test that starts one (subprocess, multiprocessing / torch.multiprocessing, tests/dist_harness.py,
# torchx, torchrun) and is not marked slow fails at teardown, so the tier stays unit tests only.
# docs/testing.md lists the tiers.
def _spawn_points():
    import multiprocessing.util
    import os
    import subprocess

    return [(subprocess.Popen, "_execute_child"), (multiprocessing.util, "spawnv_passfds"), (os, "fork")]


@pytest.fixture(autouse=True)
def _unmarked_tests_spawn_no_process(request, monkeypatch):
    if request.node.get_closest_marker("slow") is not None:
        yield
        return
    spawned = []
    for owner, name in _spawn_points():
        real = getattr(owner, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            spawned.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(owner, name, spy)
    yield
    if spawned:
        pytest.fail(f"{request.node.nodeid} started a process ({', '.join(sorted(set(spawned)))}) but is not "
                    "marked @pytest.mark.slow (the fast tier, make test-fast, runs no process)", pytrace=False)
