"""Reading MNIST: every accepted format, and a clear error for every bad file."""
import gzip
import hashlib
import os
import pickle
import struct

import numpy as np
import pytest

import cvae_mnist as cm


@pytest.fixture(scope="module")
def small(mnist):
    """A few real digits in the loader's output form, to write in each format."""
    return dict(x_train=mnist["x_train"][:300], y_train=mnist["y_train"][:300],
                x_test=mnist["x_test"][:100], y_test=mnist["y_test"][:100])


def as_uint8(x):
    return np.round(x * 255).astype(np.uint8).reshape(-1, 28, 28)


def write_pkl(path, parts):
    with gzip.open(path / "mnist.pkl.gz", "wb") as f:
        pickle.dump(parts, f, protocol=2)


def write_idx(path, images, labels, split, magic_x=0x803, magic_y=0x801, count=None):
    names = {("train", "x"): "train-images-idx3-ubyte.gz", ("train", "y"): "train-labels-idx1-ubyte.gz",
             ("test", "x"): "t10k-images-idx3-ubyte.gz", ("test", "y"): "t10k-labels-idx1-ubyte.gz"}
    n = len(labels) if count is None else count
    with gzip.open(path / names[split, "x"], "wb") as f:
        f.write(struct.pack(">4I", magic_x, n, 28, 28) + images.tobytes())
    with gzip.open(path / names[split, "y"], "wb") as f:
        f.write(struct.pack(">2I", magic_y, n) + labels.astype(np.uint8).tobytes())


def load(path):
    return cm.load_mnist(str(path), download=False)


def test_classic_pickle_stacks_train_and_valid(tmp_path, small):
    write_pkl(tmp_path, ((small["x_train"][:200], small["y_train"][:200].astype(np.int64)),
                         (small["x_train"][200:], small["y_train"][200:].astype(np.int64)),
                         (small["x_test"], small["y_test"].astype(np.int64))))
    got = load(tmp_path)
    for key in small:
        np.testing.assert_array_equal(got[key], small[key])
    assert got["x_train"].dtype == np.float32 and got["y_train"].dtype == np.int32


def test_uint8_pixels_are_scaled_to_unit_range(tmp_path, small):
    write_pkl(tmp_path, ((as_uint8(small["x_train"][:200]), small["y_train"][:200]),
                         (as_uint8(small["x_train"][200:]), small["y_train"][200:]),
                         (as_uint8(small["x_test"]), small["y_test"])))
    got = load(tmp_path)
    assert got["x_train"].shape == (300, 784) and got["x_test"].shape == (100, 784)
    np.testing.assert_allclose(got["x_train"], small["x_train"], atol=0.5 / 255 + 1e-6)
    np.testing.assert_array_equal(got["y_test"], small["y_test"])


def test_a_keras_npz_is_not_read_and_the_error_names_what_is(tmp_path, small):
    """Keras' mnist.npz is not read: a folder holding only it has no MNIST."""
    np.savez(tmp_path / "mnist.npz", x_train=as_uint8(small["x_train"]), y_train=small["y_train"],
             x_test=as_uint8(small["x_test"]), y_test=small["y_test"])
    with pytest.raises(cm.UserError, match=r"^no complete MNIST in .*: mnist\.pkl\.gz .*"
                                           r"t10k-labels-idx1-ubyte\.gz$"):
        load(tmp_path)


def test_idx_files(tmp_path, small):
    for split in ("train", "test"):
        write_idx(tmp_path, as_uint8(small[f"x_{split}"]), small[f"y_{split}"], split)
    got = load(tmp_path)
    assert got["x_train"].shape == (300, 784) and 0 <= got["x_train"].min() < got["x_train"].max() <= 1
    np.testing.assert_array_equal(got["y_train"], small["y_train"])


def test_no_data_and_no_download_names_the_files(tmp_path):
    with pytest.raises(cm.UserError) as err:
        load(tmp_path)
    for name in ["mnist.pkl.gz", "t10k-labels-idx1-ubyte.gz", "train-images-idx3-ubyte.gz",
                 str(tmp_path)]:
        assert name in str(err.value)


def test_partial_idx_set_names_what_is_missing(tmp_path, small):
    write_idx(tmp_path, as_uint8(small["x_train"]), small["y_train"], "train")
    with pytest.raises(cm.UserError, match="t10k-images-idx3-ubyte.gz"):
        load(tmp_path)


def good_parts(small):
    return ((small["x_train"], small["y_train"]), (small["x_train"][:10], small["y_train"][:10]),
            (small["x_test"], small["y_test"]))


BAD_PKL = {
    "empty file": lambda p, s: (p / "mnist.pkl.gz").write_bytes(b""),
    "truncated gzip": lambda p, s: (write_pkl(p, good_parts(s)), (p / "mnist.pkl.gz").write_bytes(
        (p / "mnist.pkl.gz").read_bytes()[:5000])),
    "html page": lambda p, s: (p / "mnist.pkl.gz").write_bytes(
        b"<!DOCTYPE html><html><body>404 Not Found</body></html>"),
    "wrong shape": lambda p, s: write_pkl(p, ((s["x_train"][:, :700], s["y_train"]),) * 3),
    "wrong dtype": lambda p, s: write_pkl(p, ((s["x_train"].astype(str), s["y_train"]),) * 3),
    "labels out of range": lambda p, s: write_pkl(p, ((s["x_train"], s["y_train"] + 1),) * 3),
    "nan pixels": lambda p, s: write_pkl(p, ((np.where(s["x_train"] > 0.5, np.nan, s["x_train"]),
                                              s["y_train"]),) * 3),
    "not a tuple": lambda p, s: write_pkl(p, {"x": s["x_train"]}),
}


@pytest.mark.parametrize("kind", sorted(BAD_PKL))
def test_bad_pickle_gets_one_clear_line(tmp_path, small, kind):
    BAD_PKL[kind](tmp_path, small)
    with pytest.raises(cm.UserError) as err:
        load(tmp_path)
    message = str(err.value)
    assert "mnist.pkl.gz" in message and "Delete or replace it" in message
    assert "\n" not in message
    assert ("web page" in message) == (kind == "html page")


class Boom:
    """Unpickling this would run os.system: a naive pickle.load executes it."""
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_malicious_pickle_runs_no_code(tmp_path, small, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_pkl(tmp_path, ((small["x_train"], small["y_train"]), (Boom(), small["y_train"]),
                         (small["x_test"], small["y_test"])))
    with pytest.raises(cm.UserError, match="posix.system|os.system|nt.system"):
        load(tmp_path)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("fault", ["magic", "count"])
def test_bad_idx_files(tmp_path, small, fault):
    write_idx(tmp_path, as_uint8(small["x_test"]), small["y_test"], "test")
    if fault == "magic":
        write_idx(tmp_path, as_uint8(small["x_train"]), small["y_train"], "train", magic_x=0x801)
        expected = "magic number"
    else:
        write_idx(tmp_path, as_uint8(small["x_train"]), small["y_train"], "train", count=301)
        expected = "holds"
    with pytest.raises(cm.UserError, match=expected):
        load(tmp_path)


def test_mismatched_idx_label_count(tmp_path, small):
    write_idx(tmp_path, as_uint8(small["x_test"]), small["y_test"], "test")
    write_idx(tmp_path, as_uint8(small["x_train"]), small["y_train"], "train")
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">2I", 0x801, 299) + small["y_train"][:299].astype(np.uint8).tobytes())
    with pytest.raises(cm.UserError, match="labels have shape"):
        load(tmp_path)


def test_download_lands_verified_file_and_nothing_else(tmp_path):
    cm.fetch_mnist(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["mnist.pkl.gz"]
    assert hashlib.sha256((tmp_path / "mnist.pkl.gz").read_bytes()).hexdigest() == cm.MNIST_SHA256


def test_failed_download_leaves_nothing_behind(tmp_path, monkeypatch):
    # pip is pointed at a closed local port: the download fails at once
    for key, value in {"PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
                       "PIP_RETRIES": "0", "PIP_TIMEOUT": "2"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(cm.UserError, match="download failed.*t10k-labels-idx1-ubyte.gz"):
        cm.load_mnist(str(tmp_path), download=True)
    assert os.listdir(tmp_path) == []
