import pytest
import torch

from tests import reliability_plugin
from tests.reliability_plugin import pytest_addoption  # noqa: F401  (the --reliability-out option)


def pytest_configure(config):
    reliability_plugin.configure(config)


def pytest_collection_modifyitems(config, items):
    for item in items:
        reliability_plugin.check_marker(item)
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
