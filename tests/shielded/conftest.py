import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """The machine is shared: keep every shielded test on one torch thread."""
    yield
