import pytest
import torch
from flow_toys import randomized

from latentforge_core import registry


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models and small tensors gain nothing from intra-op threads; on a shared 2-core runner a
    second OpenMP thread only adds contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dit():
    """A random-weight ``test-dit`` (latents 4×8×8, 10 classes) for the samplers' tests."""
    return randomized(registry.generators.build("test-dit", in_channels=4, input_size=8, num_classes=10), 0)
