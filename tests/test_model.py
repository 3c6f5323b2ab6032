"""The model's distributions, its bound, and the importance-sampled likelihood."""
import dataclasses
import subprocess
import sys

import numpy as np
import pytest

import cvae_mnist as cm
from conftest import ROOT

tf, tfd = cm.tf, cm.tfd
STEPS = 40  # Adam steps for the z_dim = 1 model of the importance-sampling tests


def tiny(**changes):
    return dataclasses.replace(cm.Config(), z_dim=4, hidden_units=32, **changes)


def session(g):
    sess = cm.tf.Session(graph=g.graph, config=cm.session_config(cm.Config(threads=1)))
    sess.run(g.init)
    return sess


@pytest.fixture(scope="module")
def batch(mnist):
    """64 fixed binarized training digits [64, 784] and their labels [64]."""
    return cm.binarize(mnist["x_train"][:64], 0), mnist["y_train"][:64]


def test_import_does_no_work(tmp_path):
    code = ("import sys, os, cvae_mnist; "
            "print('tensorflow' in sys.modules, sorted(os.listdir('.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, env={"PYTHONPATH": ROOT}, check=True).stdout
    assert out.strip() == "False []"


def test_distribution_shapes(batch):
    cfg = tiny()
    g = cm.build_graph(cfg)
    with g.graph.as_default():
        x = tf.constant(batch[0])
        y = tf.constant(batch[1])
        q = cm.encoder(x, y, cfg)
        z = q.sample(3, seed=[1, 2])
        p_x = cm.decoder(z, y, cfg)
        p_z = cm.prior(cfg)
        shapes = [q.batch_shape_tensor(), q.event_shape_tensor(), p_z.batch_shape_tensor(),
                  p_z.event_shape_tensor(), z.shape.as_list(), p_x.batch_shape_tensor(),
                  p_x.event_shape_tensor(), p_x.log_prob(x)]
    with session(g) as sess:
        got = sess.run([s for s in shapes if not isinstance(s, list)])
    q_batch, q_event, p_batch, p_event, px_batch, px_event, log_px = got
    assert list(q_batch) == [64] and list(q_event) == [4]
    assert list(p_batch) == [] and list(p_event) == [4]
    assert shapes[4] == [3, 64, 4]
    assert list(px_batch) == [3, 64] and list(px_event) == [784]
    assert log_px.shape == (3, 64)


def test_each_network_is_created_once():
    cfg = tiny()
    g = cm.build_graph(cfg)
    with g.graph.as_default():
        before = {v.op.name: v.shape.as_list() for v in tf.trainable_variables()}
        cm.decoder(tf.zeros([5, cfg.z_dim]), tf.zeros([5], tf.int32), cfg)  # one more call
        cm.encoder(tf.zeros([5, 784]), tf.zeros([5], tf.int32), cfg)
        after = {v.op.name: v.shape.as_list() for v in tf.trainable_variables()}
    # encoder: h1, h2, mean_scale; decoder: h1, h2, logits; a weight and a bias each
    assert len(before) == 12 and after == before
    assert before["encoder/h1/w"] == [784 + 10, 32]
    assert before["decoder/h1/w"] == [4 + 10, 32]
    assert before["decoder/logits/w"] == [32, 784]
    assert before["encoder/mean_scale/w"] == [32, 2 * 4]


def ancestors(tensor):
    """Names of every op that `tensor` is computed from."""
    seen, todo = set(), [tensor.op]
    while todo:
        op = todo.pop()
        if op.name not in seen:
            seen.add(op.name)
            todo.extend(i.op for i in op.inputs)
            todo.extend(op.control_inputs)
    return seen


def test_evaluation_and_figures_read_the_averaged_weights():
    g = cm.build_graph(tiny(ema_decay=0.99))
    for tensor in (g.log_px, g.x_mean, g.z_mean):
        names = ancestors(tensor)
        assert "decoder/logits/w/ExponentialMovingAverage" in names or tensor is g.z_mean
        assert "encoder/h1/w/ExponentialMovingAverage" in names or tensor is g.x_mean
        assert "decoder/logits/w" not in names and "encoder/h1/w" not in names
    assert "decoder/logits/w" in ancestors(g.stats)          # training uses the live weights
    plain = cm.build_graph(tiny(ema_decay=0.0))
    assert "decoder/logits/w" in ancestors(plain.x_mean)
    assert plain.average_op is plain.train_op


def test_elbo_of_a_batch_is_finite_and_negative(batch):
    cfg = tiny()
    g = cm.build_graph(cfg)
    with g.graph.as_default():
        eps = tf.random.stateless_normal([1, 64, cfg.z_dim], [3, 4])
        bound, recon, kl = cm.elbo(tf.constant(batch[0]), tf.constant(batch[1]), cfg, eps)
    with session(g) as sess:
        bound, recon, kl = sess.run([bound, recon, kl])
    assert bound.shape == (64,) and np.isfinite(bound).all()
    assert (bound < 0).all() and (kl >= 0).all()
    np.testing.assert_allclose(bound, recon - kl, rtol=1e-6)


def test_closed_form_kl_matches_monte_carlo(batch):
    cfg = tiny()
    g = cm.build_graph(cfg)
    n = 20000
    with g.graph.as_default():
        q = cm.encoder(tf.constant(batch[0][:8]), tf.constant(batch[1][:8]), cfg)
        # make q far from the prior, so the test can tell the terms apart
        q = tfd.Independent(tfd.Normal(q.mean() + 1.5, q.stddev() * 0.4), 1)
        z = q.sample(n, seed=[5, 6])
        log_ratio = q.log_prob(z) - cm.prior(cfg).log_prob(z)          # [n, 8]
        kl = tfd.kl_divergence(q, cm.prior(cfg))
    with session(g) as sess:
        log_ratio, kl = sess.run([log_ratio, kl])
    stderr = log_ratio.std(0) / np.sqrt(n)
    assert (kl > 5).all()
    assert (np.abs(log_ratio.mean(0) - kl) < 4 * stderr).all()


@pytest.fixture(scope="module")
def one_dim_model(mnist):
    """A z_dim = 1 model after a few steps, where log p(x|y) can be computed exactly
    by quadrature over z. Returns (session, graph, x, y, exact log p(x|y) [16])."""
    # no weight average: the quadrature below reads the same (live) weights as log_px
    cfg = dataclasses.replace(cm.Config(), z_dim=1, hidden_units=32, ll_samples=1000,
                              ema_decay=0.0)
    g = cm.build_graph(cfg, mnist["x_train"].mean(0))
    sess = session(g)
    sess.run(g.load_data, {g.x_data: mnist["x_train"][:2560], g.y_data: mnist["y_train"][:2560]})
    sess.run(g.prepare, {g.order: np.arange(2560, dtype=np.int32), g.epoch_in: 1})
    for step in range(STEPS):
        sess.run(g.train_op, {g.batch_in_epoch: step % 20})
    with g.graph.as_default():   # widen q(z|x,y): a poor proposal, a clear gap
        head_b, = [v for v in tf.global_variables() if v.op.name == "encoder/mean_scale/b"]
        sess.run(tf.assign_add(head_b, [0.0, 1.1]))                 # [mean, scale] of z
    x, y = cm.binarize(mnist["x_test"][:16], 1), mnist["y_test"][:16]
    grid = np.linspace(-8, 8, 4001, dtype=np.float32)
    with g.graph.as_default():
        z = tf.constant(np.broadcast_to(grid[:, None, None], (len(grid), 16, 1)))
        log_joint = cm.decoder(z, tf.constant(y), cfg).log_prob(tf.constant(x)) \
            + cm.prior(cfg).log_prob(z)                                        # [G, 16]
        exact = tf.reduce_logsumexp(log_joint, 0) + np.log(grid[1] - grid[0])
    yield sess, g, x, y, sess.run(exact)
    sess.close()


def log_px(model, k, copies=1, seed=0):
    """IS estimates [copies, 16] with k samples each, and the matching 1-sample ELBOs."""
    sess, g, x, y, _ = model
    lp, lb = sess.run([g.log_px, g.test_elbo], {g.x_in: np.tile(x, (copies, 1)),
                                               g.y_in: np.tile(y, copies), g.k_in: k,
                                               g.seed_in: [seed, 1]})
    return lp.reshape(copies, 16), lb.reshape(copies, 16)


def test_importance_sampling_equals_elbo_at_one_sample(one_dim_model):
    lp, lb = log_px(one_dim_model, 1, copies=2000)
    # both are unbiased estimates of the ELBO; compare per digit within 5 std errors
    se = np.sqrt(lp.var(0) / 2000 + lb.var(0) / 2000)
    assert (np.abs(lp.mean(0) - lb.mean(0)) < 5 * se).all()


def test_importance_sampling_tightens_towards_exact_log_likelihood(one_dim_model):
    exact = one_dim_model[4]
    elbo = log_px(one_dim_model, 1, copies=400)[1].mean(0)
    gaps = {k: exact - log_px(one_dim_model, k, copies=20)[0].mean(0) for k in (1, 10, 1000)}
    assert (elbo < exact).all()
    assert (gaps[1000] > -0.05).all()                        # a lower bound in expectation
    assert gaps[1].mean() > gaps[10].mean() > gaps[1000].mean()
    assert gaps[1000].mean() < 0.05 * gaps[1].mean()         # nearly exact with 1000
    assert (log_px(one_dim_model, 1000)[0].ravel() > elbo).all()


def test_importance_sampling_is_finite_for_extreme_images(one_dim_model):
    sess, g = one_dim_model[:2]
    extremes = np.stack([np.zeros(784), np.ones(784)]).astype(np.float32)
    lp, lb = sess.run([g.log_px, g.test_elbo], {g.x_in: extremes, g.y_in: [3, 8],
                                               g.k_in: 1000, g.seed_in: [0, 0]})
    assert np.isfinite(lp).all() and np.isfinite(lb).all()
    assert lp[1] < lp[0] < 0         # an all-ink page is the less likely, but not -inf


@pytest.mark.parametrize("split", [1, 3])
def test_fast_training_step_matches_a_plain_reference(mnist, split):
    """The step's ELBO (training set inside the graph, binarized, ordered and its z
    noise drawn once per epoch, sliced per step, computed in `split` parts,
    BinaryBernoulli log-likelihood, TFP's closed-form KL) equals a plain computation
    from a fed numpy batch with TFP's stock Bernoulli, the reparameterization and the
    KL formula written out, for the same digits and the same draws: binarization and
    noise keyed by the two halves of the key split from (SEED, epoch)."""
    cfg = tiny(batch_size=64, train_split=split)
    order = np.random.default_rng(5).permutation(512).astype(np.int32)
    epoch, t = 3, 2                                    # step 2 of epoch 3 of a fresh graph
    idx = order[t * 64:(t + 1) * 64]
    g = cm.build_graph(cfg, mnist["x_train"].mean(0))
    with g.graph.as_default():
        probs = tf.placeholder(tf.float32, [512, 784])
        labels = tf.placeholder(tf.int32, [64])
        bin_key, eps_key = tf.unstack(
            tf.random.experimental.stateless_split(tf.constant([cfg.seed, epoch]), 2))
        lit = tf.random.stateless_uniform([512, 784], bin_key) < probs
        x = tf.cast(tf.gather(lit, idx), tf.float32)
        q = cm.encoder(x, labels, cfg)
        mu, sigma = q.mean(), q.stddev()
        eps = tf.random.stateless_normal([1, 512, cfg.z_dim], eps_key)[:, t * 64:(t + 1) * 64]
        logits = cm.decoder(mu + sigma * eps, labels, cfg).distribution.logits
        recon = tfd.Independent(tfd.Bernoulli(logits=logits, dtype=tf.float32), 1).log_prob(x)[0]
        kl = 0.5 * tf.reduce_sum(mu ** 2 + sigma ** 2 - 1 - 2 * tf.math.log(sigma), -1)
        reference = tf.stack([tf.reduce_mean(recon - kl), tf.reduce_mean(recon),
                              tf.reduce_mean(kl)])
    with session(g) as sess:
        sess.run(g.load_data, {g.x_data: mnist["x_train"][:512], g.y_data: mnist["y_train"][:512]})
        sess.run(g.prepare, {g.order: order, g.epoch_in: epoch})
        fast = sess.run(g.stats, {g.batch_in_epoch: t})
        plain = sess.run(reference, {probs: mnist["x_train"][:512], labels: mnist["y_train"][idx]})
    np.testing.assert_allclose(fast, plain, rtol=1e-5)
    assert fast[0] < -100                                        # an untrained model
