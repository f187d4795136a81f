import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture
def registry():
    from ltframe.plugins import make_plugin_manager

    return make_plugin_manager()[1]
