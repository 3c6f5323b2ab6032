"""cvae_mnist.load(): a trained run from Python, on the training script's own graph."""
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import cvae_mnist as cm
from conftest import ROOT


@pytest.fixture(scope="module")
def model(trained):
    with cm.load(str(trained[0])) as m:
        yield m


def test_samples_have_the_documented_shape_and_repeat_by_seed(model):
    sevens = model.sample(7, 16)
    assert sevens.shape == (16, 28, 28) and sevens.dtype == np.float32
    assert 0 <= sevens.min() and sevens.max() <= 1
    np.testing.assert_array_equal(sevens, model.sample(7, 16))
    np.testing.assert_array_equal(sevens, model.sample(7, 16, seed=0))
    assert not np.allclose(sevens, model.sample(7, 16, seed=1))
    assert not np.allclose(sevens, model.sample(1, 16))           # the same z, another digit


def test_encode_and_decode_shapes_and_a_reconstruction(model, mnist):
    x, y = mnist["x_test"][:8].reshape(8, 28, 28), mnist["y_test"][:8]
    z = model.encode(x, y)
    assert z.shape == (8, 16)
    again = model.decode(z, y)
    assert again.shape == (8, 28, 28)
    binary = cm.binarize(mnist["x_test"][:8], cm.EVAL_SET_KEY)
    # a reconstruction is closer to its own digit than to the others
    distance = ((again.reshape(8, 1, 784) - binary[None]) ** 2).sum(-1)
    assert (distance.argmin(1) == np.arange(8)).mean() >= 0.75


def test_classify_agrees_with_the_label_mixture_of_the_evaluation(model, trained, mnist):
    """The evaluation's classifier reuses its LL_SAMPLES estimate of the true label; classify
    estimates every close label afresh, with draws of its own. Where q is a poor proposal for a
    wrong label, two such estimates scatter by a few nats (README, The label mixture), so the
    two must agree wherever the best two labels are 5 nats apart, and nearly everywhere."""
    cfg = model.cfg
    data = cm.prepare_data(trained[1])
    x, y = data["x_eval"][:100], data["y_eval"][:100]
    p = model.classify(x)
    assert p.shape == (100, 10) and np.allclose(p.sum(1), 1)
    own = cm.importance_sampled(model.sess, model.g, cfg, x, y, cfg.ll_samples, cm.STREAM_EVAL)
    joint = cm.label_scores(model.sess, model.g, cfg, x, model.sess.run(model.g.log_prior),
                            (y, own["log_px"]))
    top2 = np.sort(joint, 1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 5
    assert clear.sum() >= 30                              # a small model, 4 epochs
    np.testing.assert_array_equal(p.argmax(1)[clear], joint.argmax(1)[clear])
    assert (p.argmax(1) == joint.argmax(1)).mean() >= 0.9    # near ties of a 4-epoch model
    assert (p.argmax(1) == y).mean() > 0.7


def test_log_likelihood_is_the_evaluation_s_estimate(model, trained, mnist):
    cfg = model.cfg
    data = cm.prepare_data(trained[1])
    got = model.log_likelihood(mnist["x_test"][:50], mnist["y_test"][:50], samples=50)
    want = cm.importance_sampled(model.sess, model.g, cfg, data["x_eval"][:50],
                                 data["y_eval"][:50], 50, cm.STREAM_EVAL)["log_px"]
    np.testing.assert_allclose(got, want, rtol=1e-5)     # the same binarization and draws
    assert (got < 0).all()


def test_bad_inputs_and_folders_are_one_line(model, tmp_path, trained):
    with pytest.raises(cm.UserError, match="needs a label in 0..9 for each of the 3 inputs"):
        model.encode(np.zeros((3, 784)), [1, 2])
    with pytest.raises(cm.UserError, match="needs a label in 0..9"):
        model.sample(12, 4)
    with pytest.raises(cm.UserError, match=f"^{re.escape(str(tmp_path))}/ holds no checkpoint"):
        cm.load(str(tmp_path))
    shutil.copytree(trained[0] / "checkpoints", tmp_path / "r" / "checkpoints")
    for name in os.listdir(tmp_path / "r" / "checkpoints"):
        if name != "settings.json":
            os.remove(tmp_path / "r" / "checkpoints" / name)
    with pytest.raises(cm.UserError, match="holds no checkpoint"):   # settings, no weights
        cm.load(str(tmp_path / "r"))


def readme_snippet():
    """The Python snippet of the README's 'Using a trained model' section, as written."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    found = re.search(r"<!-- the snippet a test runs -->\n```python\n(.*?)```", text, re.S)
    assert found, "the README has lost its snippet"
    return found.group(1)


def test_the_readme_snippet_runs_as_written(trained, tmp_path):
    shutil.copytree(trained[0], tmp_path / "results")
    proc = subprocess.run([sys.executable, "-c", readme_snippet()], cwd=tmp_path,
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert os.path.exists(tmp_path / "sevens.png")
