"""Shared test setup."""
import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    """Every unit test uses small models: intra-op threads buy nothing there and, on a shared 2-core
    machine, make tiny forward passes up to ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
