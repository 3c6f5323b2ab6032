"""LABELS: the semi-supervised CVAE (Kingma et al. 2014's M2), its bounds, data and refusals."""
import dataclasses
import json
import os
import re
import subprocess

import numpy as np
import pytest

import benchmark as bm
import cvae_mnist as cm
from conftest import ROOT, small_config
from test_model import tiny
from test_run import run_main

tf = cm.tf
BEFORE_M2 = "3b49a21"   # the last revision without LABELS: its CVAE graph must not move


@pytest.fixture(scope="module")
def batch(mnist):
    """64 fixed binarized training digits [64, 784] and their labels [64]."""
    return cm.binarize(mnist["x_train"][:64], 0), mnist["y_train"][:64]


def m2_terms(cfg, x_u, x_l, y_l, seed):
    """m2's terms, and beside them, from the same draws: each digit's ELBO under every label
    [B, 10] (digit b's label k at row 10b + k) and q(y|x_u) [B, 10]."""
    g = tf.Graph()
    with g.as_default():
        terms = cm.m2(tf.constant(x_u), tf.constant(x_l), tf.constant(y_l), cfg, seed)
        _, seed_u = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        labels = np.tile(np.arange(10), len(x_u)).astype(np.int32)
        each = cm.elbo(tf.constant(np.repeat(x_u, 10, 0)), tf.constant(labels), cfg, seed_u)
        q = cm.classifier(tf.constant(x_u), cfg).probs_parameter()
        with tf.Session() as sess:
            sess.run(tf.global_variables_initializer())
            return sess.run([terms, tf.reshape(each["elbo"], [-1, 10]), q])


def test_the_unlabelled_bound_is_its_sum_written_out(batch):
    """U(x) = sum_y q(y|x) [ELBO(x,y) + log p(y)] + H(q(y|x)), p(y) = 1/10, against numpy on the
    same ELBO rows. Catches a label-major layout (x repeated, labels tiled the other way), a
    missing entropy or log p(y), a mean for the sum. The graph adds ten float32 products of
    size <= 600 nats (rounding 2^-24 each, a few 1e-4 nats); rtol 1e-5 is 6e-3 nats here."""
    x, y = batch
    cfg = tiny(labels=10)
    terms, each, q = m2_terms(cfg, x[:6], x[6:12], y[6:12], [3, 4])
    assert np.allclose(q.sum(1), 1, atol=1e-5) and q.shape == (6, 10)
    written = (q * (each - np.log(10))).sum(1) - (q * np.log(q)).sum(1)
    np.testing.assert_allclose(terms["unlabelled"], written, rtol=1e-5)
    # U(x) <= log sum_y p(y) exp(ELBO(x,y)) (Gibbs: sum_y q a_y + H(q) <= logsumexp_y a_y), the
    # step of the derivation where q(y|x) enters; 1e-3 covers the graph's float32 rounding above
    assert (terms["unlabelled"] <= np.logaddexp.reduce(each - np.log(10), 1) + 1e-3).all()
    assert terms["labelled"].shape == terms["xent"].shape == (6,) and (terms["xent"] > 0).all()


def test_the_classifier_learns_from_the_unlabelled_bound_and_the_alpha_term(batch):
    """q(y|x) gets a gradient from U(x) (through q's weights on the ten bounds) and from
    -log q(y|x), and none from the labelled bound: that is why the ALPHA term is there."""
    x, y = batch
    cfg = tiny(labels=10)
    g = tf.Graph()
    with g.as_default():
        terms = cm.m2(tf.constant(x[:8]), tf.constant(x[8:16]), tf.constant(y[8:16]), cfg, [1, 2])
        weights = tf.trainable_variables("classifier")
        grads = {name: tf.gradients(tf.reduce_mean(terms[name]), weights)
                 for name in ("unlabelled", "xent", "labelled")}
        assert all(grad is None for grad in grads["labelled"])
        with tf.Session() as sess:
            sess.run(tf.global_variables_initializer())
            norms = {name: sum(float(np.abs(sess.run(grad)).sum()) for grad in grads[name])
                     for name in ("unlabelled", "xent")}
    assert len(weights) == 6 and norms["unlabelled"] > 0 and norms["xent"] > 0


def graph_ops(module, cfg):
    """(name, type) of every op build_graph makes for cfg, in order."""
    g = module.build_graph(cfg)
    return [(op.name, op.type) for op in g.graph.get_operations()]


def test_labels_0_builds_the_cvae_graph_as_before_m2(tmp_path):
    """LABELS = 0 makes, op for op, the graph of the revision before M2: the same initial
    weights and draws, so the CVAE's numbers do not move. LABELS adds the classifier."""
    known = subprocess.run(["git", "cat-file", "-e", f"{BEFORE_M2}^{{commit}}"], cwd=ROOT,
                           capture_output=True)
    if known.returncode:
        pytest.skip(f"this copy has no git history holding {BEFORE_M2}")
    old = bm.revision(BEFORE_M2, str(tmp_path))
    config = dict(z_dim=4, hidden_units=32, threads=1)
    assert graph_ops(cm, tiny()) == graph_ops(old, dataclasses.replace(old.Config(), **config))
    g = cm.build_graph(tiny(labels=10))
    assert g.q_y is not None and cm.build_graph(tiny()).q_y is None
    with g.graph.as_default():
        names = {v.op.name for v in tf.trainable_variables()}
    assert {name for name in names if name.startswith("classifier/")} == {
        f"classifier/{layer}/{part}" for layer in ("h1", "h2", "logits") for part in "wb"}


def test_the_labelled_digits_are_balanced_seeded_and_never_validation_digits(mnist, tmp_path):
    cfg = small_config(os.path.join(ROOT, "data"), tmp_path, labels=100, validation=True)
    data = cm.prepare_data(cfg)
    chosen, y = data["labelled"], data["y_train"]
    assert len(y) == 50000 and len(set(chosen)) == 100 and chosen.max() < 50000
    np.testing.assert_array_equal(data["x_train"][chosen], mnist["x_train"][chosen])
    assert (np.bincount(y[chosen], minlength=10) == 10).all()
    np.testing.assert_array_equal(chosen, cm.labelled_digits(cfg, y))
    other = cm.labelled_digits(dataclasses.replace(cfg, seed=7), y)
    assert len(set(chosen) & set(other)) < 10                 # about 100 * 100 / 50000 alike


def checkpointed_labelled_digits(results):
    path = tf.train.latest_checkpoint(str(results / "checkpoints"))
    return tf.train.load_variable(path, "labelled_digits")


def test_no_unlabelled_digit_s_label_reaches_the_graph(small_data_dir, tmp_path, monkeypatch):
    """The same run with every unlabelled digit's label changed trains to the same numbers."""
    rows, out = run_main(small_config(small_data_dir, tmp_path / "a", labels=20))
    assert "on 20 labelled and 1260 unlabelled digits (each step enumerates the ten labels" in out
    assert re.search(r"^Epoch 1 \(.*\): Unlabelled bound = -\d+\.\d\d  \[labelled bound = "
                     r"-\d+\.\d\d, -log q\(y\|x\) = \d+\.\d{3}\]$", out, re.M)
    assert re.search(r"^>> Test accuracy of argmax_y q\(y\|x\) = 0\.\d{4}$", out, re.M)
    prepare = cm.prepare_data

    def relabelled(cfg):
        data = prepare(cfg)
        unlabelled = np.setdiff1d(np.arange(len(data["y_train"])), data["labelled"])
        data["y_train"][unlabelled] = (data["y_train"][unlabelled] + 3) % 10
        return data
    monkeypatch.setattr(cm, "prepare_data", relabelled)
    again, _ = run_main(small_config(small_data_dir, tmp_path / "b", labels=20))
    train = [key for key in rows[0] if key.startswith("train_")]
    assert sorted(train) == ["train_labelled", "train_unlabelled", "train_xent"]
    assert [rows[0][key] for key in train] == [again[0][key] for key in train]
    assert 0 <= rows[0]["eval_classifier_accuracy"] <= 1 and rows[0]["eval_accuracy"] is not None


def test_a_resumed_run_keeps_its_labelled_digits(small_data_dir, tmp_path):
    run_main(small_config(small_data_dir, tmp_path, labels=20, seed=1))
    first = checkpointed_labelled_digits(tmp_path)
    data = cm.prepare_data(small_config(small_data_dir, tmp_path, labels=20, seed=1))
    np.testing.assert_array_equal(first, data["labelled"])
    rows, out = run_main(small_config(small_data_dir, tmp_path, labels=20, seed=2, epochs=2))
    assert "SEED 1 -> 2" in out.splitlines()[0]
    np.testing.assert_array_equal(checkpointed_labelled_digits(tmp_path), first)
    other = cm.prepare_data(small_config(small_data_dir, tmp_path, labels=20, seed=2))
    assert not np.array_equal(other["labelled"], first)
    with cm.load(str(tmp_path)) as model:
        q = model.classifier(np.zeros((3, 784)))
        assert q.shape == (3, 10) and np.allclose(q.sum(1), 1, atol=1e-5)
        assert model.classify(np.zeros((3, 784))).shape == (3, 10)   # Bayes' rule stays
    with pytest.raises(cm.UserError, match="made with LABELS = 20; this run has LABELS = 30"):
        cm.main(small_config(small_data_dir, tmp_path, labels=30, epochs=3))


@pytest.mark.parametrize("change, words", [
    (dict(labels=15), "LABELS = 15: it must be 0, or a multiple of 10"),
    (dict(labels=10, conditional=False), "LABELS = 10 trains M2, a CVAE on the ELBO: set "
                                         "CONDITIONAL = True and OBJECTIVE = 'elbo'"),
    (dict(labels=10, objective="iwae"), "LABELS = 10 trains M2"),
    (dict(labels=10, alpha=-1.0), "ALPHA = -1.0: it must be a number >= 0"),
    (dict(labels=200, train_limit=150), "LABELS = 200 needs 20 digits of each class; the 150 "
                                        "training digits have"),
    (dict(labels=1240), "LABELS = 1240 needs 124 digits of each class"),
])
def test_m2_refusals_are_one_line_before_work(small_data_dir, tmp_path, change, words):
    cfg = dataclasses.replace(small_config(small_data_dir, tmp_path / "r"), **change)
    with pytest.raises(cm.UserError, match=re.escape(words)) as err:
        cm.main(cfg)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_a_run_from_before_labels_resumes_as_the_cvae_and_refuses_labels(small_data_dir,
                                                                          tmp_path):
    """settings.json without LABELS: the run knew every label (LABELS = 0)."""
    run_main(small_config(small_data_dir, tmp_path))
    path = tmp_path / "checkpoints" / "settings.json"
    older = json.loads(path.read_text())
    del older["labels"], older["alpha"]
    path.write_text(json.dumps(older))
    with pytest.raises(cm.UserError, match=re.escape(
            "made with LABELS = 0; this run has LABELS = 20. Set RESUME = False")):
        cm.main(small_config(small_data_dir, tmp_path, labels=20, epochs=2))
    rows, out = run_main(small_config(small_data_dir, tmp_path, epochs=2))
    assert [r["epoch"] for r in rows] == [1, 2]


def test_the_classifier_of_a_cvae_run_is_refused(trained):
    with cm.load(str(trained[0])) as model:
        with pytest.raises(cm.UserError, match="only a run with LABELS has the classifier"):
            model.classifier(np.zeros((1, 784)))
