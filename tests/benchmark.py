"""Throughput benchmark: `python tests/benchmark.py [--against REV]` (a script, not a test).

Prints the CPU's model, then, for the default settings:
- training: steps per second of whole epochs of the real train_epoch (data handling, every
  fetch and check, the weight average every EMA_EVERY steps: what the log's `Epoch N (Ts)`
  measures), for the ELBO, the IWAE bound with K = 5 and M2 with LABELS = 100 (its steps of
  B unlabelled digits, each with ten labels), against the matmul ceiling: the
  step's 17 multiplies (forward, and the weight and input gradients, but x's, of the six
  layers) run alone, side by side;
- three plain-TensorFlow steps of the same model, data in memory, no TFP (multiplies, bias and
  ReLU; + the ELBO's terms; + Adam), which show where the time beyond the multiplies goes;
- the importance-sampled evaluation in (digit, sample) pairs per second against its forward
  multiplies alone, and against those multiplies plus the Bernoulli log-likelihood;
- with --against REV: whole epochs of revision REV's cvae_mnist.py (git show), in float32
  (an older revision's PRECISION set so), interleaved with this one's;
- the import and graph-build times, and the peak memory of a real default run.
Last lines: `train/matmul ratio`, `IWAE K = 5/ELBO epoch speed` and `M2/ELBO step speed`.

This machine's speed drifts from minute to minute (other work on the host), so every
measurement gets one timed window per round, and each ratio is the median over rounds of the
ratio within a round.

What the measurements say is in docs/measurements.md (Speed).
"""
import argparse
import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
ROUNDS = 5  # timed rounds; each ratio is the median over rounds


def window_rate(run, units, repeats):
    """units * repeats / seconds of `repeats` calls of run()."""
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return units * repeats / (time.perf_counter() - start)


def interleaved(runners, rounds=ROUNDS):
    """runners: {name: (run, units, repeats)}. Returns {name: [rate per round]}, one
    window of each runner per round, after two untimed calls of each."""
    for run, _, _ in runners.values():
        for _ in range(2):
            run()
    rates = {name: [] for name in runners}
    for _ in range(rounds):
        for name, (run, units, repeats) in runners.items():
            rates[name].append(window_rate(run, units, repeats))
    return rates


def layer_shapes(cm, cfg):
    """(fan_in, fan_out) of every dense layer, encoder first."""
    h, z, c, x = cfg.hidden_units, cfg.z_dim, cm.N_CLASSES, cm.X_DIM
    enc = [(x + c, h), (h, h), (h, 2 * z)]
    dec = [(z + c, h), (h, h), (h, x)]
    return enc, dec


def session(cm, cfg, graph, init):
    """A session on `graph` with the script's thread settings, `init` already run."""
    tf = cm.tf
    sess = tf.Session(graph=graph, config=tf.ConfigProto(
        intra_op_parallelism_threads=cfg.threads, inter_op_parallelism_threads=cfg.threads))
    sess.run(init)
    return sess


def matmul_ceiling(cm, cfg, rows, backward, decoder_rows=None):
    """A callable that runs the step's matrix multiplies alone, all independent of each other,
    in float32. The encoder runs on `rows` rows, the decoder on `decoder_rows`
    (default the same). With backward, each layer also gets its weight gradient, and every
    layer but the encoder's first (whose input is data) its input gradient."""
    tf = cm.tf
    enc, dec = layer_shapes(cm, cfg)
    graph = tf.Graph()
    with graph.as_default():
        ops = []

        def operand(shape):
            return tf.Variable(tf.random.normal(shape))
        for i, (n, shapes) in enumerate([(rows, enc), (decoder_rows or rows, dec)]):
            for j, (d_in, d_out) in enumerate(shapes):
                a, w, g = operand([n, d_in]), operand([d_in, d_out]), operand([n, d_out])
                products = [tf.matmul(a, w)]
                if backward:
                    products.append(tf.matmul(a, g, transpose_a=True))
                    if (i, j) != (0, 0):
                        products.append(tf.matmul(g, w, transpose_b=True))
                ops += [tf.reduce_sum(p[:1, :1]) for p in products]
        total = tf.add_n(ops)
        init = tf.global_variables_initializer()
    sess = session(cm, cfg, graph, init)
    return lambda: sess.run(total)


def plain_dense(tf, h, d_out, relu):
    """A dense layer in plain TensorFlow ops: h [N, D] -> [N, d_out]."""
    w = tf.Variable(tf.random.normal([int(h.shape[-1]), d_out]) * 0.03)
    out = tf.nn.bias_add(tf.matmul(h, w), tf.Variable(tf.zeros([d_out])))
    return tf.nn.relu(out) if relu else out


def plain_step(cm, cfg, terms, adam):
    """A callable that runs one training step of the same model written in plain
    TensorFlow, with a fixed binarized batch and fixed noise already in memory (no
    data handling, no TFP). terms=False: the loss is a plain sum of the logits and
    z, so the step is the multiplies, bias, ReLU and their gradients; terms=True:
    the real ELBO terms (softplus Bernoulli likelihood, Gaussian KL). adam=False:
    plain gradient descent instead of Adam."""
    tf = cm.tf
    graph = tf.Graph()
    b, c = cfg.batch_size, cm.N_CLASSES
    with graph.as_default():
        x = tf.Variable(tf.cast(tf.random.uniform([b, cm.X_DIM]) < 0.2, tf.float32),
                        trainable=False)
        y_hot = tf.Variable(tf.one_hot(tf.range(b) % c, c), trainable=False)
        eps = tf.Variable(tf.random.normal([b, cfg.z_dim]), trainable=False)

        def mlp(h):
            return plain_dense(tf, plain_dense(tf, h, cfg.hidden_units, True),
                               cfg.hidden_units, True)
        h = mlp(tf.concat([x, y_hot], 1))
        mu, raw = tf.split(plain_dense(tf, h, 2 * cfg.z_dim, False), 2, axis=1)
        sigma = tf.exp(raw)
        z = mu + sigma * eps
        logits = plain_dense(tf, mlp(tf.concat([z, y_hot], 1)), cm.X_DIM, False)
        if terms:
            recon = -tf.reduce_sum(tf.nn.softplus((1 - 2 * x) * logits), 1)
            kl = 0.5 * tf.reduce_sum(mu ** 2 + sigma ** 2 - 1 - 2 * raw, 1)
            loss = -tf.reduce_mean(recon - kl)
        else:
            loss = tf.reduce_mean(logits) + tf.reduce_mean(z)
        optimizer = (tf.train.AdamOptimizer(cfg.learning_rate) if adam
                     else tf.train.GradientDescentOptimizer(cfg.learning_rate))
        step = optimizer.minimize(loss, gate_gradients=optimizer.GATE_GRAPH)
        init = tf.global_variables_initializer()
    sess = session(cm, cfg, graph, init)
    return lambda: sess.run([step, loss])


def plain_likelihood(cm, cfg):
    """A callable that runs the evaluation batch's decoder multiplies and the
    Bernoulli log-likelihood of every (sample, digit) pair, nothing else."""
    tf = cm.tf
    rows = cfg.test_batch_size * cfg.ll_samples
    graph = tf.Graph()
    with graph.as_default():
        h = tf.Variable(tf.random.normal([rows, cfg.z_dim + cm.N_CLASSES]))
        for _, d_out in layer_shapes(cm, cfg)[1]:
            h = plain_dense(tf, h, d_out, relu=d_out != cm.X_DIM)
        x = tf.Variable(tf.cast(tf.random.uniform([rows, cm.X_DIM]) < 0.2, tf.float32))
        log_p = -tf.reduce_sum(tf.nn.softplus((1 - 2 * x) * h), 1)
        total = tf.reduce_sum(log_p[:1])
        init = tf.global_variables_initializer()
    sess = session(cm, cfg, graph, init)
    return lambda: sess.run(total)


def training_runner(cm, cfg, data):
    """{epoch: a callable that trains one whole epoch with cm.train_epoch (epochs 1, 2, ... in
    turn), g: its graph, sess: its session}. cm may be another revision of cvae_mnist."""
    g = cm.build_graph(cfg)
    sess = session(cm, cfg, g.graph, g.init)
    if hasattr(g, "load_data"):      # a revision from before the Graph dataclass
        sess.run(g.load_data, {g.x_data: data["x_train"], g.y_data: data["y_train"]})
    elif getattr(cfg, "labels", 0):  # M2: the labelled digits apart, as a run loads them
        data = dict(data, labelled=cm.labelled_digits(cfg, data["y_train"]))
        with g.graph.as_default():   # as in a run: Variable.load takes the graph's session
            cm.load_training_set(sess, g, cfg, data, 0)
    else:
        sess.run(g.data.load, {g.data.x_all: data["x_train"], g.data.y_all: data["y_train"]})
    n = len(data["x_train"]) - getattr(cfg, "labels", 0)
    epoch = iter(range(1, 10 ** 6))
    return dict(epoch=lambda: cm.train_epoch(sess, g, cfg, next(epoch), n), g=g, sess=sess)


def evaluation_runner(cm, cfg, g, sess, x, y):
    """A callable that runs one LL_SAMPLES importance-sampled evaluation batch."""
    per_batch = cfg.test_batch_size
    feeds = [{g.x_in: x[i:i + per_batch], g.y_in: y[i:i + per_batch],
              g.k_in: cfg.ll_samples, g.seed_in: [0, i]} for i in range(0, len(x), per_batch)]
    batch = iter(range(10 ** 9))
    return lambda: sess.run([g.log_px, g.test_elbo], feeds[next(batch) % len(feeds)])


def revision(rev, folder):
    """cvae_mnist.py as it is at git revision `rev`, imported as a module of its own."""
    path = os.path.join(folder, f"cvae_mnist_{re.sub(r'[^0-9A-Za-z]', '_', rev)}.py")
    with open(path, "w") as f:
        f.write(subprocess.run(["git", "show", f"{rev}:cvae_mnist.py"], cwd=ROOT, check=True,
                               capture_output=True, text=True).stdout)
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module     # as importlib's recipe does: dataclasses look it up
    spec.loader.exec_module(module)
    return module


def peak_memory_of_a_run():
    """Peak resident MB of `python cvae_mnist.py`-style run: full data, default model,
    one epoch and a 1000-sample evaluation of 1000 test digits. Call it before this process
    grows: Linux counts the parent's resident set at the fork into the child's peak."""
    import resource                                     # POSIX only
    with tempfile.TemporaryDirectory() as results:
        code = ("import cvae_mnist as c; c.main(c.Config(epochs=1, test_limit=1000, "
                f"results_dir={results!r}, data_dir={os.path.join(ROOT, 'data')!r}))")
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def report(title, unit, rates, ceiling, labels):
    """Prints the median rate of each measurement and its median per-round ratio to
    `ceiling`; returns the ratios."""
    print(f"{title} ({unit}; median of {len(rates[ceiling])} rounds, ratio to the ceiling):")
    ratios = {}
    for name, label in labels.items():
        rate = np.median(rates[name])
        ratios[name] = np.median(np.array(rates[name]) / np.array(rates[ceiling]))
        print(f"  {label:<62} {rate:>9,.1f}  {ratios[name]:.2f}")
    return ratios


def cpu():
    """The CPU's model name, as lscpu gives it (Linux; 'unknown' elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return "unknown"
    model = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
    if model is None:
        return "unknown"
    return model.group(1)


def float32_config(cm):
    """cm's default Config, in float32: a revision from before bfloat16 went had PRECISION."""
    cfg = cm.Config()
    if hasattr(cfg, "precision"):
        cfg = dataclasses.replace(cfg, precision="float32")
    return cfg


def main(against=None):
    print(f"CPU: {cpu()}, {os.cpu_count()} cores")
    peak = peak_memory_of_a_run()                       # first, while this process is small
    start = time.perf_counter()
    import cvae_mnist as cm
    cfg = cm.Config()
    cm.tf.constant(0)                                   # finish importing TensorFlow
    imported = time.perf_counter() - start
    data = cm.load_mnist(os.path.join(ROOT, cfg.data_dir))
    start = time.perf_counter()
    cm.build_graph(cfg)
    print(f"import: {imported:.2f}s, graph build: {time.perf_counter() - start:.2f}s")

    default = training_runner(cm, cfg, data)
    iwae5 = training_runner(cm, cm.Config(objective="iwae", train_samples=5), data)
    m2 = training_runner(cm, cm.Config(labels=100), data)
    runners = {"train": default["epoch"], "iwae5": iwae5["epoch"], "m2": m2["epoch"]}
    if against:                             # that revision's own defaults, in float32
        old = revision(against, tempfile.mkdtemp())
        runners["old"] = training_runner(old, float32_config(old), data)["epoch"]
    for run in runners.values():
        run()                                           # a warm-up epoch each, untimed
    steps = len(data["x_train"]) // cfg.batch_size
    rates = interleaved(dict(
        {name: (run, steps, 1) for name, run in runners.items()},
        ceiling=(matmul_ceiling(cm, cfg, cfg.batch_size, backward=True), 1, 200),
        mm=(plain_step(cm, cfg, terms=False, adam=False), 1, 200),
        terms=(plain_step(cm, cfg, terms=True, adam=False), 1, 200),
        adam=(plain_step(cm, cfg, terms=True, adam=True), 1, 200)))
    labels = {"ceiling": "matmul ceiling: the step's multiplies alone, side by side",
              "train": "cvae_mnist.train_epoch: whole epochs, data handling included",
              "mm": "plain-TF step: multiplies, bias, ReLU; gradient descent",
              "terms": "plain-TF step: + the ELBO's terms (Bernoulli, KL)",
              "adam": "plain-TF step: + Adam (the real step's maths, data in memory)",
              "iwae5": "train_epoch of the IWAE bound, K = 5",
              "m2": "train_epoch of M2, LABELS = 100 (steps of B unlabelled digits)"}
    if against:
        labels["old"] = f"train_epoch of revision {against}, float32"
    train = report("training", "steps/s", rates, "ceiling", labels)

    x_test = cm.binarize(data["x_test"][:200], 0)
    units = cfg.test_batch_size * cfg.ll_samples
    rates_eval = interleaved({
        "eval": (evaluation_runner(cm, cfg, default["g"], default["sess"], x_test,
                                   data["y_test"][:200]), units, 10),
        "ceiling": (matmul_ceiling(cm, cfg, cfg.test_batch_size, backward=False,
                                   decoder_rows=units), units, 10),
        "likelihood": (plain_likelihood(cm, cfg), units, 10)})
    default["sess"].close()
    evals = report("evaluation", "digit-samples/s", rates_eval, "ceiling", {
        "ceiling": "forward matmul ceiling",
        "eval": "cvae_mnist log_likelihood, LL_SAMPLES samples per digit",
        "likelihood": "decoder multiplies + Bernoulli log-likelihood only"})
    print(f"evaluation/matmul ratio: {evals['eval']:.2f}")
    print(f"peak memory of a default run: {peak:.0f} MB")
    within = {name: np.median(np.array(rates[name]) / np.array(rates["train"]))
              for name in ("old", "iwae5", "m2") if name in rates}
    if against:
        print(f"{against}/this epoch speed: {within['old']:.2f}")
    print(f"train/matmul ratio: {train['train']:.2f}")
    print(f"IWAE K = 5/ELBO epoch speed: {within['iwae5']:.2f}")
    print(f"M2/ELBO step speed: {within['m2']:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", metavar="REV", help="a git revision to time epochs beside")
    main(parser.parse_args().against)
