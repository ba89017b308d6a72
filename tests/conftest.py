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


@pytest.fixture(scope="module")
def highdim_shape_4096():
    """The highdim benchmark's problems at d = 4,096, shaped as a 4×32×32 latent (the sampler tests' size)."""
    from comfy_poe.benchmarks import highdim

    highdim.SHAPES[4096] = (4, 32, 32)
    yield 4096
    highdim.SHAPES.pop(4096, None)


class ItemModel:
    """Two Λ = 2 experts whose disagreement depends on the particle's state for batch item 0 only (its FK
    weights degenerate) and is zero for item 1 (its weights stay equal); any latent shape."""

    parameterization = "eps"

    def denoise(self, x, sigma, conds):
        item = (torch.arange(x.shape[0]) % 2).reshape((-1,) + (1,) * (x.ndim - 1))
        shift = torch.where(item == 0, 3.0 * torch.tanh(x), torch.zeros(1))
        base = x / (1 + sigma.reshape((-1,) + (1,) * (x.ndim - 1)) ** 2)
        return [base + shift if c == "a" else base - shift for c in conds]


@pytest.fixture
def item_model():
    """A fresh :class:`ItemModel` (one degenerate batch item beside one with equal weights)."""
    return ItemModel()
