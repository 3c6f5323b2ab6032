"""Throughput benchmark: `python tests/benchmark.py` (a script, not a pytest test).

Prints, for this machine and the default settings:
- training steps per second of whole epochs of the real `train_epoch` (data handling,
  every fetch and check, the weight average every EMA_EVERY steps: what the per-epoch
  log measures), against the matmul ceiling: the same matrix multiplies (forward,
  input gradients and weight gradients of every dense layer at the same shapes) run
  alone, side by side, in steps per second;
- three plain-TensorFlow training steps of the same model with the data already in
  memory and no TFP, each adding one part of the real step (multiplies with bias and
  ReLU; the ELBO's elementwise terms; Adam), which show where the time beyond the
  multiplies goes;
- the importance-sampled evaluation in (digits x samples) per second against its own
  forward-only matmul ceiling, and against the multiplies plus the Bernoulli
  log-likelihood alone;
- the time to import the module and build the graph, and the peak resident memory of
  a real default run (one epoch, evaluation on 1,000 test digits with 1,000 samples);
- last line: `train/matmul ratio: 0.xx`.

This machine's speed drifts while it runs (other work on the host), so the timings
are taken in rounds, one window of each measurement per round, and each ratio is the
median over rounds of the ratio within a round.
"""
import os
import resource
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
    sess = cm.tf.Session(graph=graph, config=cm.session_config(cfg))
    sess.run(init)
    return sess


def matmul_ceiling(cm, cfg, rows, backward, decoder_rows=None):
    """A callable that runs the step's matrix multiplies alone, all independent of
    each other. The encoder runs on `rows` rows, the decoder on `decoder_rows`
    (default the same). With backward, each layer also gets its weight gradient,
    and every layer but the encoder's first (whose input is data) its input gradient."""
    tf = cm.tf
    enc, dec = layer_shapes(cm, cfg)
    graph = tf.Graph()
    with graph.as_default():
        ops = []
        for i, (n, shapes) in enumerate([(rows, enc), (decoder_rows or rows, dec)]):
            for j, (d_in, d_out) in enumerate(shapes):
                a = tf.Variable(tf.random.normal([n, d_in]))
                w = tf.Variable(tf.random.normal([d_in, d_out]))
                g = tf.Variable(tf.random.normal([n, d_out]))
                ops.append(tf.reduce_sum(tf.matmul(a, w)[:1, :1]))
                if backward:
                    ops.append(tf.reduce_sum(tf.matmul(a, g, transpose_a=True)[:1, :1]))
                    if (i, j) != (0, 0):
                        ops.append(tf.reduce_sum(tf.matmul(g, w, transpose_b=True)[:1, :1]))
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
        step = optimizer.minimize(loss)
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
    """A callable that trains one whole epoch with train_epoch (epochs 1, 2, ... in
    turn), and its graph and session."""
    g = cm.build_graph(cfg)
    sess = session(cm, cfg, g.graph, g.init)
    sess.run(g.load_data, {g.x_data: data["x_train"], g.y_data: data["y_train"]})
    n = len(data["x_train"])
    epoch = iter(range(1, 10 ** 6))
    return lambda: cm.train_epoch(sess, g, cfg, next(epoch), n), g, sess


def evaluation_runner(cm, cfg, g, sess, x, y):
    """A callable that runs one LL_SAMPLES importance-sampled evaluation batch."""
    per_batch = cfg.test_batch_size
    feeds = [{g.x_in: x[i:i + per_batch], g.y_in: y[i:i + per_batch],
              g.k_in: cfg.ll_samples, g.seed_in: [0, i]} for i in range(0, len(x), per_batch)]
    batch = iter(range(10 ** 9))
    return lambda: sess.run([g.log_px, g.test_elbo], feeds[next(batch) % len(feeds)])


def peak_memory_of_a_run():
    """Peak resident MB of `python cvae_mnist.py`-style run: full data, default model,
    one epoch and a 1000-sample evaluation of 1000 test digits."""
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


def main():
    start = time.perf_counter()
    import cvae_mnist as cm
    cfg = cm.Config()
    cm.tf.constant(0)                                   # finish importing TensorFlow
    imported = time.perf_counter() - start
    data = cm.load_mnist(os.path.join(ROOT, cfg.data_dir))
    start = time.perf_counter()
    cm.build_graph(cfg)
    built = time.perf_counter() - start
    print(f"import: {imported:.2f}s, graph build: {built:.2f}s")

    epoch, g, sess = training_runner(cm, cfg, data)
    epoch()                                             # warm-up epoch, untimed
    steps = len(data["x_train"]) // cfg.batch_size
    rates = interleaved({
        "train": (epoch, steps, 1),
        "ceiling": (matmul_ceiling(cm, cfg, cfg.batch_size, backward=True), 1, 200),
        "mm": (plain_step(cm, cfg, terms=False, adam=False), 1, 200),
        "terms": (plain_step(cm, cfg, terms=True, adam=False), 1, 200),
        "adam": (plain_step(cm, cfg, terms=True, adam=True), 1, 200)})
    train = report("training", "steps/s", rates, "ceiling", {
        "ceiling": "matmul ceiling: the step's multiplies alone, side by side",
        "train": "cvae_mnist.train_epoch: whole epochs, data handling included",
        "mm": "plain-TF step: multiplies, bias, ReLU; gradient descent",
        "terms": "plain-TF step: + the ELBO's terms (Bernoulli, KL)",
        "adam": "plain-TF step: + Adam (the real step's maths, data in memory)"})

    x_test = cm.binarize(data["x_test"][:200], 0)
    units = cfg.test_batch_size * cfg.ll_samples
    rates = interleaved({
        "eval": (evaluation_runner(cm, cfg, g, sess, x_test, data["y_test"][:200]), units, 10),
        "ceiling": (matmul_ceiling(cm, cfg, cfg.test_batch_size, backward=False,
                                   decoder_rows=units), units, 10),
        "likelihood": (plain_likelihood(cm, cfg), units, 10)})
    sess.close()
    evals = report("evaluation", "digit-samples/s", rates, "ceiling", {
        "ceiling": "forward matmul ceiling",
        "eval": "cvae_mnist log_likelihood, LL_SAMPLES samples per digit",
        "likelihood": "decoder multiplies + Bernoulli log-likelihood only"})
    print(f"evaluation/matmul ratio: {evals['eval']:.2f}")
    print(f"peak memory of a default run: {peak_memory_of_a_run():.0f} MB")
    print(f"train/matmul ratio: {train['train']:.2f}")


if __name__ == "__main__":
    main()
