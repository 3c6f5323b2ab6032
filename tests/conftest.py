"""Shared fixtures: real MNIST (fetched once by the project itself) and small configs."""
import dataclasses
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cvae_mnist  # noqa: E402


@pytest.fixture(scope="session")
def mnist():
    """The real data set, from the repository's data/ (downloaded there if missing)."""
    return cvae_mnist.load_mnist(os.path.join(ROOT, "data"))


@pytest.fixture(scope="session")
def small_data_dir(mnist, tmp_path_factory):
    """A data folder holding a real-MNIST subset (1,280 training, 500 test digits) as
    mnist.npz, so end-to-end runs load in a blink."""
    path = tmp_path_factory.mktemp("small_mnist")
    np.savez(path / "mnist.npz", x_train=mnist["x_train"][:1280], y_train=mnist["y_train"][:1280],
             x_test=mnist["x_test"][:500], y_test=mnist["y_test"][:500])
    return str(path)


def small_config(data_dir, results_dir, **changes):
    """A configuration small enough for a test: a thin model, short epochs, cheap
    evaluation, every figure and evaluation every epoch."""
    base = dict(epochs=1, batch_size=64, z_dim=8, hidden_units=64, save_freq=1, test_freq=1,
                ll_samples=20, ll_samples_interim=5, test_batch_size=50, threads=1,
                data_dir=str(data_dir), download=False, results_dir=str(results_dir),
                test_limit=200)
    base.update(changes)
    return dataclasses.replace(cvae_mnist.Config(), **base)
