"""Shared fixtures: real MNIST (fetched once by the project itself) and small configs."""
import dataclasses
import gzip
import os
import pickle
import re
import sys

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
    """A data folder holding a real-MNIST subset (1,280 training, 500 test digits) as the
    classic pickle, so end-to-end runs load in a blink."""
    path = tmp_path_factory.mktemp("small_mnist")
    write_small_pkl(path, mnist, 1280, 500)
    return str(path)


# The lines TensorFlow's libraries may print as they load (absl's banner, INFO lines such as
# "Could not find cuda drivers"): on stderr before any setting of TensorFlow's is read.
TENSORFLOW_STARTUP = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|I\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] .*")


def our_stderr(stderr):
    """stderr without TensorFlow's start-up lines: what the script itself wrote."""
    return "".join(line for line in stderr.splitlines(keepends=True)
                   if not TENSORFLOW_STARTUP.fullmatch(line.rstrip("\n")))


def write_small_pkl(folder, mnist, n_train, n_test):
    """The first n_train training and n_test test digits as folder/mnist.pkl.gz, in the classic
    pickle's layout (train, valid, test); the valid part is the last ten training digits."""
    x, y = mnist["x_train"][:n_train], mnist["y_train"][:n_train]
    with gzip.open(os.path.join(folder, "mnist.pkl.gz"), "wb", compresslevel=1) as f:
        pickle.dump(((x[:-10], y[:-10]), (x[-10:], y[-10:]),
                     (mnist["x_test"][:n_test], mnist["y_test"][:n_test])), f, protocol=2)


def small_config(data_dir, results_dir, **changes):
    """A configuration small enough for a test: a thin model, short epochs, cheap
    evaluation, every figure and evaluation every epoch."""
    base = dict(epochs=1, batch_size=64, z_dim=8, hidden_units=64, save_freq=1, test_freq=1,
                ll_samples=20, ll_samples_interim=5, test_batch_size=50, threads=1,
                data_dir=str(data_dir), download=False, results_dir=str(results_dir),
                test_limit=200)
    base.update(changes)
    return dataclasses.replace(cvae_mnist.Config(), **base)


@pytest.fixture(scope="session")
def trained(mnist, tmp_path_factory):
    """A finished run of a small CVAE good enough to be asked about digits (about 80% of test
    digits read right): 4 epochs on 20,000 digits. Returns (results folder, its config)."""
    data, results = tmp_path_factory.mktemp("trained_data"), tmp_path_factory.mktemp("trained")
    write_small_pkl(data, mnist, 20000, 500)
    cfg = small_config(data, results, epochs=4, z_dim=16, hidden_units=256, batch_size=100,
                       ll_samples=50, test_freq=10, save_freq=10)
    cvae_mnist.main(cfg)
    return results, cfg
