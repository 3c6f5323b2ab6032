"""Throughput benchmark: `python tests/benchmark.py` (a script, not a pytest test).

Prints, for this machine and the default settings:
- training steps per second of the real training step (steady state, median of windows),
- the matmul ceiling: the same matrix multiplies (forward, input gradients, weight
  gradients of every dense layer at the same shapes) run alone, in steps per second,
- the importance-sampled evaluation in (digits x samples) per second against its own
  forward-only matmul ceiling,
- the time to import the module and build the graph, and the peak resident memory of
  a real default run (one epoch, evaluation on 1,000 test digits with 1,000 samples),
- last line: `train/matmul ratio: 0.xx`.
"""
import dataclasses
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def median_rate(run, units, windows=7, repeats=40):
    """Median over `windows` timed windows of `repeats` calls: units per second."""
    rates = []
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        rates.append(units * repeats / (time.perf_counter() - start))
    return float(np.median(rates))


def layer_shapes(cfg):
    """(fan_in, fan_out) of every dense layer, encoder first."""
    h, z, c, x = cfg.hidden_units, cfg.z_dim, 10, 784
    enc = [(x + c, h), (h, h), (h, 2 * z)]
    dec = [(z + c, h), (h, h), (h, x)]
    return enc, dec


def matmul_ceiling(cm, cfg, rows, backward, decoder_rows=None):
    """Steps per second of the step's matrix multiplies alone. The encoder runs on
    `rows` rows, the decoder on `decoder_rows` (default the same). With backward,
    each layer also gets its weight gradient, and every layer but the encoder's first
    (whose input is data) its input gradient."""
    tf = cm.tf
    enc, dec = layer_shapes(cfg)
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
    sess = tf.Session(graph=graph, config=cm.session_config(cfg))
    sess.run(init)
    for _ in range(20):
        sess.run(total)
    rate = median_rate(lambda: sess.run(total), 1)
    sess.close()
    return rate


def train_rate(cm, cfg, data, epochs=5):
    """Steps per second of whole training epochs, run by train_epoch itself: the
    per-epoch shuffle and binarization, every step's fetch and check, the weight
    average every EMA_EVERY steps. Median over epochs, after one of warm-up."""
    g = cm.build_graph(cfg, data["x_train"].mean(0))
    sess = cm.tf.Session(graph=g.graph, config=cm.session_config(cfg))
    sess.run(g.init)
    sess.run(g.load_data, {g.x_data: data["x_train"], g.y_data: data["y_train"]})
    n = len(data["x_train"])
    rates = []
    for epoch in range(1, epochs + 2):
        start = time.perf_counter()
        cm.train_epoch(sess, g, cfg, epoch, n)
        rates.append(n // cfg.batch_size / (time.perf_counter() - start))
    return float(np.median(rates[1:])), g, sess


def eval_rate(cm, cfg, g, sess, x, y):
    """(digits x samples) per second of the LL_SAMPLES importance-sampled pass."""
    per_batch = cfg.test_batch_size
    feeds = [{g.x_in: x[i:i + per_batch], g.y_in: y[i:i + per_batch],
              g.k_in: cfg.ll_samples, g.seed_in: [0, i]} for i in range(0, len(x), per_batch)]
    counter = iter(range(10 ** 9))

    def batch():
        sess.run([g.log_px, g.test_elbo], feeds[next(counter) % len(feeds)])
    for _ in range(5):
        batch()
    return median_rate(batch, per_batch * cfg.ll_samples, windows=5, repeats=6)


def peak_memory_of_a_run():
    """Peak resident MB of `python cvae_mnist.py`-style run: full data, default model,
    one epoch and a 1000-sample evaluation of 1000 test digits."""
    with tempfile.TemporaryDirectory() as results:
        code = ("import cvae_mnist as c; c.main(c.Config(epochs=1, test_limit=1000, "
                f"results_dir={results!r}, data_dir={os.path.join(ROOT, 'data')!r}))")
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def main():
    start = time.perf_counter()
    import cvae_mnist as cm
    cfg = cm.Config()
    cm.tf.constant(0)                                   # finish importing TensorFlow
    imported = time.perf_counter() - start
    data = cm.load_mnist(os.path.join(ROOT, cfg.data_dir))
    start = time.perf_counter()
    cm.build_graph(cfg, data["x_train"].mean(0))
    built = time.perf_counter() - start
    print(f"import: {imported:.2f}s, graph build: {built:.2f}s")
    train, g, sess = train_rate(cm, cfg, data)
    train_ceiling = matmul_ceiling(cm, cfg, cfg.batch_size, backward=True)
    x_test = cm.binarize(data["x_test"][:200], 0)
    evals = eval_rate(cm, cfg, g, sess, x_test, data["y_test"][:200])
    eval_ceiling = matmul_ceiling(cm, cfg, cfg.test_batch_size, backward=False,
                                  decoder_rows=cfg.test_batch_size * cfg.ll_samples)
    eval_ceiling *= cfg.test_batch_size * cfg.ll_samples
    sess.close()
    print(f"evaluation: {evals:,.0f} digit-samples/s, forward matmul ceiling "
          f"{eval_ceiling:,.0f}/s, ratio {evals / eval_ceiling:.2f}")
    print(f"peak memory of a default run: {peak_memory_of_a_run():.0f} MB")
    print(f"training: {train:.1f} steps/s ({60000 // cfg.batch_size / train:.2f}s per epoch), "
          f"matmul ceiling {train_ceiling:.1f} steps/s")
    print(f"train/matmul ratio: {train / train_ceiling:.2f}")


if __name__ == "__main__":
    main()
