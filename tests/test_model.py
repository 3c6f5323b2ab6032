"""The model's distributions, its bound, and the importance-sampled likelihood."""
import dataclasses
import subprocess
import sys

import numpy as np
import pytest

import cvae_mnist as cm
from conftest import ROOT

tf, tfd = cm.tf, cm.tfd
STEPS = 300  # Adam steps for the z_dim = 1 model of the importance-sampling tests


def tiny(**changes):
    return dataclasses.replace(cm.Config(), z_dim=4, hidden_units=32, threads=1,
                               **changes)


def session(g):
    sess = cm.tf.Session(graph=g.graph, config=g.session_config)
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
    assert out.strip() == "True []"           # TensorFlow loads, as every TF script's does


def test_distribution_shapes(batch):
    cfg = tiny()
    g = cm.build_graph(cfg)
    with g.graph.as_default():
        x = tf.constant(batch[0])
        y = tf.constant(batch[1])
        q = cm.encoder(x, y, cfg)
        z = q.sample(3, seed=[1, 2])
        p_x = tfd.Independent(tfd.Bernoulli(logits=cm.decoder(z, y, cfg)), 1)
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
    """Names of every op that `tensor` (or op, or a list of them) is computed from."""
    tensors = tensor if isinstance(tensor, list) else [tensor]
    seen, todo = set(), [getattr(t, "op", t) for t in tensors]
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
    assert "decoder/logits/w" in ancestors(list(g.stats.values()))  # training: live weights
    plain = cm.build_graph(tiny(ema_decay=0.0))
    assert "decoder/logits/w" in ancestors(plain.x_mean)
    with plain.graph.as_default():                               # no average to keep
        assert not any("ExponentialMovingAverage" in v.op.name for v in tf.global_variables())


def test_prior_is_the_standard_normal():
    cfg = tiny()
    z = np.random.default_rng(0).standard_normal((6, cfg.z_dim)).astype(np.float32) * 2
    with tf.Graph().as_default(), tf.Session() as sess:
        got = sess.run(cm.prior(cfg).log_prob(z))
    want = (-0.5 * z.astype(np.float64) ** 2 - 0.5 * np.log(2 * np.pi)).sum(1)
    np.testing.assert_allclose(got, want, rtol=1e-6)             # a few float32 roundings


def test_binary_log_likelihood_equals_tfp_bernoulli():
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((3, 5, 784)) * np.array([1, 10, 40])[:, None, None])
    x = (rng.random((3, 5, 784)) < 0.3).astype(np.float32)
    with tf.Graph().as_default(), tf.Session() as sess:
        logits = tf.constant(logits.astype(np.float32))
        ours = cm.binary_log_likelihood(logits, tf.constant(x))
        tfp_own = tfd.Independent(tfd.Bernoulli(logits=logits, dtype=tf.float32), 1).log_prob(x)
        ours, tfp_own = sess.run([ours, tfp_own])
    assert ours.shape == (3, 5)
    # 784 terms of one sign, each within a few roundings (u = 6e-8), summed by tree reductions:
    # about (4 + log2 784) u = 8e-7 apart
    np.testing.assert_allclose(ours, tfp_own, rtol=1e-5)


@pytest.fixture(scope="module")
def one_dim_model(mnist):
    """A z_dim = 1 model after a few steps, where log p(x|y) can be computed exactly
    by quadrature over z. Returns (session, graph, x, y, exact log p(x|y) [16])."""
    cfg = one_dim_config()
    g = cm.build_graph(cfg)
    sess = session(g)
    sess.run(g.data.load, {g.data.x_all: mnist["x_train"][:2560],
                           g.data.y_all: mnist["y_train"][:2560]})
    sess.run(g.data.prepare, {g.data.order: np.arange(2560, dtype=np.int32), g.epoch_key: [1, 1]})
    for step in range(STEPS):
        sess.run(g.train_op, {g.epoch_key: [1, 1], g.batch_in_epoch: step % 20})
    with g.graph.as_default():   # widen q(z|x,y): a poor proposal, a clear gap
        head_b, = [v for v in tf.global_variables() if v.op.name == "encoder/mean_scale/b"]
        sess.run(tf.assign_add(head_b, [0.0, 1.1]))                 # [mean, scale] of z
    x, y = cm.binarize(mnist["x_test"][:16], 1), mnist["y_test"][:16]
    yield sess, g, x, y, quadrature((sess, g, x), y)
    sess.close()


def one_dim_config():
    # no weight average: the quadrature reads the same (live) weights as log_px
    return dataclasses.replace(cm.Config(), z_dim=1, hidden_units=32, ll_samples=1000,
                               ema_decay=0.0, threads=1)


def quadrature(model, labels):
    """Exact log p(x|y) [16] of the z_dim = 1 model's digits x under labels [16]: the
    integral of p(x|z,y) p(z) over z, on a fine grid over the z where the integrand
    is within 40 nats of its peak (found on a coarse grid first: an untrained
    decoder can put the posterior far out, and in two modes)."""
    sess, g, x = model[:3]

    def log_joint(grid):                                   # grid [G, 16] -> [G, 16]
        with g.graph.as_default():
            z = tf.placeholder(tf.float32, [None, 16, 1])
            joint = cm.binary_log_likelihood(cm.decoder(z, tf.constant(labels),
                                                        one_dim_config()), x) \
                + cm.prior(one_dim_config()).log_prob(z)
        return np.concatenate([sess.run(joint, {z: part[:, :, None]})
                               for part in np.array_split(grid, len(grid) // 2000 + 1)])
    coarse = np.linspace(-100, 100, 801)
    rough = log_joint(np.repeat(coarse[:, None], 16, 1))
    inside = rough > rough.max(0) - 40
    lo = np.array([coarse[inside[:, d]].min() for d in range(16)]) - 2
    hi = np.array([coarse[inside[:, d]].max() for d in range(16)]) + 2
    grid = lo + np.linspace(0, 1, 4001)[:, None] * (hi - lo)                 # [G, 16]
    joint = log_joint(grid)
    assert (joint[[0, -1]] < joint.max(0) - 30).all()     # the grid holds all the mass
    top = joint.max(0)
    return top + np.log(np.exp(joint - top).sum(0) * (grid[1] - grid[0]))


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


def softplus(a):
    return np.logaddexp(0, a)


def plain_bound(weights, cfg, x, y, eps):
    """The SGVB bound written out in numpy (float64) from the networks' weights:
    x [B, 784] binary, y [B], eps [K, B, Z] -> mean (elbo, recon, kl) [3]."""
    def mlp(h, net):
        for layer in ("h1", "h2"):
            h = np.maximum(h @ weights[f"{net}/{layer}/w"] + weights[f"{net}/{layer}/b"], 0)
        return h
    label = np.eye(10)[y]
    enc_in = np.concatenate([x, label], 1) if cfg.conditional else x
    head = mlp(enc_in, "encoder") @ weights["encoder/mean_scale/w"] + weights["encoder/mean_scale/b"]
    mu, raw = head[:, :cfg.z_dim], head[:, cfg.z_dim:]
    sigma = np.exp(raw)
    z = mu + sigma * eps                                                   # [K, B, Z]
    dec_in = np.concatenate([z, np.broadcast_to(label, z.shape[:2] + (10,))], 2) \
        if cfg.conditional else z
    logits = mlp(dec_in, "decoder") @ weights["decoder/logits/w"] + weights["decoder/logits/b"]
    # log Bernoulli(x | sigmoid(l)) = x log sigmoid(l) + (1 - x) log sigmoid(-l)
    recon = (-x * softplus(-logits) - (1 - x) * softplus(logits)).sum(-1).mean(0)
    if cfg.analytic_kl:          # KL(N(mu, sigma^2) || N(0, 1)), summed over dimensions
        kl = 0.5 * (mu ** 2 + sigma ** 2 - 1 - 2 * np.log(sigma)).sum(-1)
    else:                        # log q(z|x,y) - log p(z) at the same z, averaged over K
        log_q = (-0.5 * eps ** 2 - np.log(sigma) - 0.5 * np.log(2 * np.pi)).sum(-1)
        log_p = (-0.5 * z ** 2 - 0.5 * np.log(2 * np.pi)).sum(-1)
        kl = (log_q - log_p).mean(0)
    return np.array([(recon - kl).mean(), recon.mean(), kl.mean()])


SEED_RECIPE = dict(conditional=False, analytic_kl=False, ema_decay=0.0)


@pytest.mark.parametrize("changes", [
    dict(), dict(train_samples=3), SEED_RECIPE, dict(SEED_RECIPE, train_samples=3),
    dict(analytic_kl=False), dict(conditional=False)],
    ids=["default", "default-K3", "seed", "seed-K3", "mc-kl", "vae"])
def test_training_step_matches_the_bound_written_out(mnist, changes):
    """The step's ELBO (training set inside the graph, binarized, ordered and its z
    noise drawn once per epoch, sliced per step) equals the bound written out in numpy
    from the weights, for the same digits and the same draws: binarization and noise
    keyed by the two halves of the key split from the epoch's key."""
    cfg = tiny(batch_size=64, **changes)
    order = np.random.default_rng(5).permutation(512).astype(np.int32)
    epoch, t = 3, 2                                    # step 2 of epoch 3 of a fresh graph
    idx = order[t * 64:(t + 1) * 64]
    key = cm.random_key(cfg.seed, cm.STREAM_TRAIN, epoch)
    g = cm.build_graph(cfg)
    with g.graph.as_default():
        bin_key, eps_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
        lit = tf.random.stateless_uniform([512, 784], bin_key) < mnist["x_train"][:512]
        x = tf.cast(tf.gather(lit, idx), tf.float32)
        step_key = tf.random.experimental.stateless_fold_in(eps_key, t)
        eps = tf.random.stateless_normal([cfg.train_samples, 64, cfg.z_dim], step_key)
        weights = {v.op.name: v for v in tf.trainable_variables()}
        has_average = any("ExponentialMovingAverage" in v.op.name for v in tf.global_variables())
    with session(g) as sess:
        sess.run(g.data.load, {g.data.x_all: mnist["x_train"][:512],
                               g.data.y_all: mnist["y_train"][:512]})
        sess.run(g.data.prepare, {g.data.order: order, g.epoch_key: key})
        stats = sess.run(g.stats, {g.epoch_key: key, g.batch_in_epoch: t})
        fast = np.array([stats["elbo"], stats["recon"], stats["kl"]])
        x, eps, weights = sess.run([x, eps, weights])
    want = plain_bound({k: v.astype(np.float64) for k, v in weights.items()}, cfg,
                       x.astype(np.float64), mnist["y_train"][idx], eps.astype(np.float64))
    # float32 against float64: tree sums over 784 pixels and 32 units, about log2(800) u =
    # 6e-7 of each magnitude (u = 6e-8); 2e-5 leaves room for the KL, a sum of small terms
    np.testing.assert_allclose(fast, want, rtol=2e-5)
    assert fast[0] < -100                                        # an untrained model
    assert not any(weights[f"{net}/{layer}/b"].any() for net, layers in
                   [("encoder", ["h1", "h2", "mean_scale"]), ("decoder", ["h1", "h2", "logits"])]
                   for layer in layers)                          # biases start at zero
    assert has_average == bool(cfg.ema_decay)                    # the seed averages nothing


def test_the_vae_has_no_label_inputs():
    cfg = tiny(conditional=False)
    g = cm.build_graph(cfg)
    with g.graph.as_default():
        shapes = {v.op.name: v.shape.as_list() for v in tf.trainable_variables()}
    assert shapes["encoder/h1/w"] == [784, 32]                   # q(z|x): x alone
    assert shapes["decoder/h1/w"] == [4, 32]                     # p(x|z): z alone
    assert len(shapes) == 12
    with session(g) as sess:                                     # the label changes nothing
        x = np.random.default_rng(0).integers(0, 2, (2, 784)).astype(np.float32)
        a, b = (sess.run([g.z_mean, g.x_mean], {g.x_in: x, g.z_in: np.ones((2, 4)), g.y_in: y})
                for y in ([0, 1], [7, 3]))
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


def mixture_passes(model, log_prior, seeds):
    """label_scores' log p(x) = logsumexp_y' [log p(y') + log p(x|y')] [S, 16] and its labels
    argmax_y' [S, 16], one pass per SEED (each its own random streams)."""
    sess, g, x, y, _ = model
    mixtures, guesses = [], []
    for seed in seeds:
        cfg = dataclasses.replace(one_dim_config(), seed=seed)
        log_px_y = cm.importance_sampled(sess, g, cfg, x, y, 1000, cm.STREAM_EVAL)["log_px"]
        scores = cm.label_scores(sess, g, cfg, x, log_prior, known_labels=y,
                                 known_log_px=log_px_y)
        mixtures.append(np.logaddexp.reduce(scores, 1))
        guesses.append(scores.argmax(1))
    return np.array(mixtures), np.array(guesses)


def test_label_mixture_and_bayes_classifier_match_quadrature(one_dim_model):
    """log p(x) = logsumexp_y [log p(y) + log p(x|y)] and argmax_y p(y) p(x|y), each
    p(x|y) exact by quadrature, against the importance-sampled label_scores. The estimate's
    own noise sets the tolerance: its spread over 6 passes with different random streams (q is
    widened on purpose: 1000 samples leave 0.02 to 0.2 nats), 5 sd for each digit. Catches the mixture without log p(y) (a nat or more off), a max in place of the
    logsumexp, or a classifier that reads another label."""
    log_prior = np.log(np.random.default_rng(3).dirichlet(np.ones(10) * 2))
    exact = np.stack([quadrature(one_dim_model, np.full(16, label)) for label in range(10)], 1)
    joint = log_prior + exact                                           # [16, 10]
    want = np.logaddexp.reduce(joint, 1)
    mixtures, guesses = mixture_passes(one_dim_model, log_prior, range(1234, 1240))
    spread = mixtures.std(0, ddof=1)                           # [16], 0.02 to 0.2 measured
    assert np.median(spread) < 0.1                             # a few hundredths typically
    assert (np.abs(mixtures - want) < 5 * spread).all()
    assert (mixtures.mean(0) < want + 5 * spread / np.sqrt(6)).all()  # biased low, if at all
    top2 = np.sort(joint, 1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 10 * spread             # no tie within the noise
    assert clear.sum() >= 8
    assert (guesses[:, clear] == joint.argmax(1)[clear]).all()


def test_the_last_evaluation_costs_at_most_3_2_log_px_passes(mnist, monkeypatch):
    """Whatever the model, the label mixture refines each digit's MIXTURE_LABELS = 2 best labels
    by the cheap pass, less the true label where it is among them (its estimate is reused), so
    the last evaluation feeds 1 + 10 / CHEAP_SHARE + 2 - (that share) <= 3.2 times the
    digit-samples of its log p(x|y) pass. On an untrained model every label is close: a margin
    rule would refine all ten (10.2 times)."""
    cfg = tiny(ll_samples=100, test_batch_size=20)
    g = cm.build_graph(cfg)
    x, y = cm.binarize(mnist["x_test"][:60], cm.EVAL_SET_KEY), mnist["y_test"][:60]
    fed, cheap = [], []
    sampled = cm.importance_sampled

    def counted(sess, g, cfg, x, y, n_samples, stream):
        fed.append(len(x) * n_samples)
        out = sampled(sess, g, cfg, x, y, n_samples, stream)
        if stream == cm.STREAM_MIXTURE:
            cheap.append(out["log_px"].reshape(-1, 10).copy())     # label_scores writes in it
        return out
    monkeypatch.setattr(cm, "importance_sampled", counted)
    with session(g) as sess:
        g.log_prior.load(np.log(np.full(10, 0.1, np.float32)), sess)
        row = cm.evaluate(sess, g, cfg, x, y, last=True)
    best = np.argsort(-cheap[0], 1)[:, :2]                     # the uniform prior adds nothing
    true_among_best = (best == y[:, None]).any(1).sum()
    assert fed[0] == 60 * 100                                  # the log p(x|y) pass
    assert fed[1:] == [60 * 10 * 2, (2 * 60 - true_among_best) * 100]   # cheap; refined
    assert sum(fed) <= 3.2 * 60 * 100
    assert np.isfinite(row["eval_log_px"]) and 0 <= row["eval_accuracy"] <= 1


def ranked_sampler(refined):
    """A stand-in importance_sampled for label_scores on digits x [[0], [1]]: the cheap pass ranks
    the labels 9, 8, ..., 0 for digit 0 and 0, 1, ..., 9 for digit 1 (log_px = -100 - rank);
    each full pass notes its (digit, label) pairs in refined and gives them -50."""
    def sampler(sess, g, cfg, x, y, n_samples, stream):
        if n_samples < cfg.ll_samples:
            rank = np.where(x[:, 0] == 0, 9 - y, y)
            return dict(log_px=-100.0 - rank)
        refined.append(sorted(zip(x[:, 0].astype(int), y)))
        return dict(log_px=np.full(len(x), -50.0))
    return sampler


@pytest.mark.parametrize("labels", [1, 2, 10])
def test_the_mixture_refines_the_best_labels_chosen_without_the_true_one(monkeypatch, labels):
    """The MIXTURE_LABELS best labels by the cheap pass are refined, whatever the known label;
    the known label's estimate is reused where it is among them, and nowhere else. Catches an
    ascending sort, a known label refined always, or its estimate used out of turn."""
    cfg = tiny(ll_samples=100, mixture_labels=labels)
    refined = []
    monkeypatch.setattr(cm, "importance_sampled", ranked_sampler(refined))
    x, no_prior = np.array([[0.0], [1.0]]), np.zeros(10)
    best = [(0, 9 - k) for k in range(labels)] + [(1, k) for k in range(labels)]
    scores = cm.label_scores(None, None, cfg, x, no_prior,
                             known_labels=np.array([3, 3]), known_log_px=np.array([-7.0, -7.0]))
    assert refined[0] == sorted(pair for pair in best if pair[1] != 3)
    if labels == 10:
        assert (scores[:, 3] == -7).all()                      # among the best: reused
    else:
        assert list(scores[:, 3]) == [-106, -103]              # not: its cheap estimate
    assert (scores == -50).sum() == len(refined[0])           # the rest: cheap, below -100
    refined.clear()
    cm.label_scores(None, None, cfg, x, no_prior)
    assert refined[0] == sorted(best)


def test_the_accuracy_is_the_classifiers_that_does_not_know_the_label(mnist, monkeypatch):
    """Digit 0 (a 3) ranks its true label third by the cheap pass, though its full estimate is
    the highest: the classifier refines labels 5 and 7 alone, so it reads the digit wrong, as
    Model.classify would. (A rule that always refined the true label read it right.) log p(x)
    still takes the true label's full estimate. Digit 1 (a 2) comes first by both."""
    cfg = tiny(ll_samples=100)
    g = cm.build_graph(cfg)
    x, y = cm.binarize(mnist["x_test"][:2], cm.EVAL_SET_KEY), np.array([3, 2])
    cheap = np.full((2, 10), -110.0)
    cheap[0, [5, 7, 3]] = [-100, -101, -102]
    cheap[1, [2, 4]] = [-100, -101]

    def sampler(sess, g, cfg, x_, y_, n_samples, stream):
        digit = np.array([int(np.flatnonzero((x == row).all(1))[0]) for row in x_], int)
        if stream == cm.STREAM_EVAL:                           # the true labels' full pass
            return dict(log_px=np.full(len(x_), -10.0), elbo=np.full(len(x_), -12.0))
        if stream == cm.STREAM_MIXTURE:
            return dict(log_px=cheap[digit, y_])
        return dict(log_px=np.full(len(x_), -50.0))
    monkeypatch.setattr(cm, "importance_sampled", sampler)
    with session(g) as sess:
        g.log_prior.load(np.zeros(10, np.float32), sess)
        row = cm.evaluate(sess, g, cfg, x, y, last=True)
    assert row["eval_accuracy"] == 0.5                         # digit 0 read as a 5
    joint = cheap.copy()
    joint[0, [5, 7]] = joint[1, 4] = -50                       # refined
    joint[0, 3] = joint[1, 2] = -10                            # the true labels' full pass
    np.testing.assert_allclose(row["eval_log_px"], np.logaddexp.reduce(joint, 1).mean())


def test_iwae_at_one_sample_is_the_monte_carlo_elbo(batch):
    """K = 1: log w_1 = log p(x|z,y) + log p(z) - log q(z|x,y), the ELBO with the Monte-Carlo KL
    on the same draw; the bracket's terms are the ELBO's too."""
    cfg = tiny(train_samples=1, analytic_kl=False)
    g = tf.Graph()
    with g.as_default():
        x, y = tf.constant(batch[0]), tf.constant(batch[1])
        bound, sgvb = cm.iwae(x, y, cfg, [3, 4]), cm.elbo(x, y, cfg, [3, 4])
        with tf.Session() as sess:
            sess.run(tf.global_variables_initializer())
            bound, sgvb = sess.run([bound, sgvb])
    np.testing.assert_allclose(bound["iwae"], sgvb["elbo"], rtol=1e-6)   # float32 rounding
    np.testing.assert_allclose(bound["recon"], sgvb["recon"], rtol=1e-6)
    np.testing.assert_allclose(bound["kl"], sgvb["kl"], rtol=1e-5, atol=1e-5)


def test_the_iwae_bound_rises_with_k_toward_the_exact_log_likelihood(one_dim_model):
    """E[IWAE_K] <= E[IWAE_2K] <= log p(x|y) (Burda et al. 2015, theorem 1), against quadrature
    on the z_dim = 1 model: the means over 200 draws, each digit within 5 standard errors."""
    sess, g, x, y, exact = one_dim_model
    with g.graph.as_default():
        seed = tf.placeholder(tf.int32, [2])
        bounds = {k: cm.iwae(tf.constant(x), tf.constant(y), dataclasses.replace(
            one_dim_config(), train_samples=k), seed)["iwae"] for k in (1, 5, 50)}
    draws = {k: np.array([sess.run(bound, {seed: [k, i]}) for i in range(200)])
             for k, bound in bounds.items()}
    mean = {k: d.mean(0) for k, d in draws.items()}
    se = {k: d.std(0) / np.sqrt(200) for k, d in draws.items()}
    assert (mean[50] < exact + 5 * se[50]).all()                 # a lower bound
    assert mean[1].mean() < mean[5].mean() < mean[50].mean()      # rising with K
    assert (exact - mean[50]).mean() < 0.5 * (exact - mean[1]).mean()   # toward log p(x|y)


def test_the_iwae_step_gives_the_decoder_the_bound_s_gradient_and_the_encoder_dreg_s(batch):
    """Against the chain rule by hand, weights from numpy: the decoder's gradient of the mean
    bound is sum_k w~_k d log p(x|z_k,y)/dtheta / B; the encoder's, DReG's, is sum_k w~_k^2
    (d log w_k / dz_k) dz_k/dphi / B, with q's parameters held in log w (Tucker et al. 2018,
    eq. 7). Catches w~ in place of w~^2 (the biased path estimator), weights that carry a
    gradient, or the bound's own gradient reaching the encoder. Then one step of the real
    optimizer moves every weight against the sign of its network's gradient (Adam's first step
    is -lr g / (|g| + eps'), eps' ~ 3e-7: the sign of g), which catches a loss paired with the
    other network's variables too."""
    cfg = tiny(objective="iwae", train_samples=5)
    seed, n = [5, 6], len(batch[1])
    g = tf.Graph()
    with g.as_default():
        tf.set_random_seed(0)                                            # the same weights each run
        x, y = tf.constant(batch[0]), tf.constant(batch[1])
        losses = cm.training_objective(x, y, cfg, seed)["losses"]
        enc, dec = tf.trainable_variables("encoder"), tf.trainable_variables("decoder")
        ours = tf.gradients(losses["decoder"], dec) + tf.gradients(losses["encoder"], enc)
        q = cm.encoder(x, y, cfg)
        z = q.sample(5, seed=seed)                                       # the same draws
        recon = cm.binary_log_likelihood(cm.decoder(z, y, cfg), x)       # [K, B]
        held = tfd.Independent(tfd.Normal(tf.stop_gradient(q.mean()),
                                          tf.stop_gradient(q.stddev())), 1)
        # log w as the model adds it: |log w| ~ 550 nats, where float32's spacing is 6e-5, so
        # another order of the additions would move the weights w~ by about 1e-4
        log_w = recon - (held.log_prob(z) - cm.prior(cfg).log_prob(z))
        dlogw_dz = tf.gradients(tf.reduce_sum(log_w), z)[0]              # [K, B, Z]
        w_dec, w_enc = tf.placeholder(tf.float32, [5, n]), tf.placeholder(tf.float32, [5, n, 4])
        by_hand = tf.gradients(recon, dec, grad_ys=w_dec) + tf.gradients(z, enc, grad_ys=w_enc)
        step, _ = cm.adam_with_weight_average(losses, dataclasses.replace(cfg, ema_decay=0.0))
        with tf.Session() as sess:
            sess.run(tf.global_variables_initializer())
            got, log_w, dlogw_dz = sess.run([ours, log_w, dlogw_dz])
            w = np.exp(log_w - log_w.max(0))
            w /= w.sum(0)                                                # w~ [K, B]
            want = sess.run(by_hand, {w_dec: -w / n, w_enc: -(w ** 2)[..., None] * dlogw_dz / n})
            path = sess.run(by_hand, {w_dec: -w / n, w_enc: -w[..., None] * dlogw_dz / n})
            before = sess.run(dec + enc)
            sess.run(step)
            moved = [b - a for a, b in zip(before, sess.run(dec + enc))]
    # With the same log w, the two sides differ only by float32 rounding (u = 6e-8) of the
    # weights and of the backward sums over K B = 320 draws: at most about 320 u = 2e-5 of the
    # magnitudes summed. That error scales with the array's largest entries, not with an entry
    # near zero by cancellation (so no relative tolerance per entry): 1e-4 of the largest.
    tolerance = [1e-4 * np.abs(b).max() for b in want]
    for a, b, atol in zip(got, want, tolerance):
        np.testing.assert_allclose(a, b, rtol=0, atol=atol)
    # w~ in place of w~^2 is outside that tolerance, so the check above can tell
    assert not all(np.allclose(a, b, rtol=0, atol=atol) for a, b, atol in zip(got, path, tolerance))
    for a, b, atol in zip(moved, want, tolerance):
        sure = np.abs(b) > atol                     # where the gradient's sign is sure
        assert (np.sign(a[sure]) == -np.sign(b[sure])).all()
