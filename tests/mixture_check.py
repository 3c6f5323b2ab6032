"""How good is the label mixture's shortcut? `python tests/mixture_check.py RESULTS_DIR N`
(a script, not a test).

On the checkpoint of a finished VALIDATION = True run of the CVAE in RESULTS_DIR, and
its first N validation digits, compares cvae_mnist.label_scores (a cheap pass over
all ten labels, then LL_SAMPLES samples for the labels within the margin) with the
full LL_SAMPLES pass over all ten labels, for a few MIXTURE_SAMPLES and MIXTURE_MARGIN.
"""
import dataclasses
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cvae_mnist as c  # noqa: E402

results, n = sys.argv[1], int(sys.argv[2])
cfg = dataclasses.replace(c.Config(), results_dir=results, validation=True)
data = c.prepare_data(cfg)
x, y = data["x_eval"][:n], data["y_eval"][:n]
g = c.build_graph(cfg)
with c.tf.Session(graph=g.graph, config=g.session_config) as sess:
    sess.run(g.init)
    g.saver.restore(sess, c.tf.train.latest_checkpoint(results + "/checkpoints"))
    log_prior = sess.run(g.log_prior)
    t = time.time()
    labels = np.arange(10)
    full = c.importance_sampled(sess, g, cfg, np.repeat(x, 10, 0), np.tile(labels, n),
                                cfg.ll_samples, 99)["log_px"]   # a stream of its own
    full = full.reshape(n, 10)
    t_full = time.time() - t
    joint = log_prior + full
    ref = np.logaddexp.reduce(joint, 1)
    ref_guess = joint.argmax(1)
    log_px_y = full[np.arange(n), y]
    srt = np.sort(joint, 1)
    print(f"{n} digits; full pass over 10 labels x {cfg.ll_samples}: {t_full:.1f}s; "
          f"log p(x) {ref.mean():.4f}, log p(x|y) {log_px_y.mean():.4f}, accuracy {(ref_guess == y).mean():.4f}")
    print(f"gap best - second label (nats): median {np.median(srt[:, -1] - srt[:, -2]):.1f}, "
          f"share under 10: {(srt[:, -1] - srt[:, -2] < 10).mean():.3f}")
    for ks in (10, 20, 50):
        for margin in (5.0, 10.0, 20.0):
            cfg2 = dataclasses.replace(cfg, mixture_samples=ks, mixture_margin=margin)
            t = time.time()
            cheap = c.importance_sampled(sess, g, cfg2, np.repeat(x, 10, 0), np.tile(labels, n),
                                         ks, 98)["log_px"]
            score = log_prior + cheap.reshape(n, 10)
            refine = score >= score.max(1, keepdims=True) - margin
            refine[np.arange(n), y] = False
            scores = c.label_scores(sess, g, cfg2, x, log_prior, y, log_px_y)
            mix, guess = np.logaddexp.reduce(scores, 1), scores.argmax(1)
            dt = time.time() - t
            err = mix - ref
            print(f"MIXTURE_SAMPLES={ks:3d} MARGIN={margin:4.0f}: refined {refine.sum() / n:.3f} "
                  f"extra labels per digit; log p(x) error mean {err.mean():+.5f} max |err| "
                  f"{np.abs(err).max():.4f}; guesses differing {(guess != ref_guess).sum()}; "
                  f"accuracy {(guess == y).mean():.4f}; {dt:.1f}s (incl. a repeat of the cheap pass)")
