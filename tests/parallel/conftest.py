import pytest


@pytest.fixture(autouse=True)
def _one_thread():
    """Ranks run single-threaded; so does the in-process reference (same summation orders)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
