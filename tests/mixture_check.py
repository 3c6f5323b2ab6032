"""How good is the label mixture's shortcut? `python tests/mixture_check.py RESULTS_DIR N`
(a script, not a test).

On the checkpoint of a finished VALIDATION = True run of the CVAE in RESULTS_DIR, and its first
N validation digits, compares the last evaluation's label mixture (cvae_mnist.label_scores: a
cheap pass over all ten labels, then LL_SAMPLES samples for each digit's MIXTURE_LABELS best,
chosen without the true label; log p(x) then takes the true label's estimate of the log p(x|y)
pass, as cvae_mnist.evaluate does) with two full LL_SAMPLES passes over all ten labels, A and B,
each with its own random stream: their difference is the estimate's own noise. It is also
compared with pass A paired: A with that same estimate for the true label, so that only the
other labels' handling differs. Costs are the digit-samples fed, as a multiple of the log p(x|y)
pass (N x LL_SAMPLES).
"""
import dataclasses
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cvae_mnist as c  # noqa: E402

STREAM_A, STREAM_B = 99, 97   # the full passes' own random streams


def full_pass(sess, g, cfg, x, stream):
    """log p(x|y') [N, 10] with LL_SAMPLES for every label, on a stream of its own."""
    n = len(x)
    return c.importance_sampled(sess, g, cfg, np.repeat(x, 10, 0), np.tile(np.arange(10), n),
                                cfg.ll_samples, stream)["log_px"].reshape(n, 10)


def report(name, joint, guess, full, paired, y, seconds, cost):
    """One line: log p(x) from joint [N, 10] and the labels guessed [N] against pass A (full)
    and pass A paired."""
    mix = np.logaddexp.reduce(joint, 1)
    err = mix - np.logaddexp.reduce(full, 1)
    err_paired = mix - np.logaddexp.reduce(paired, 1)
    print(f"{name}: log p(x) {mix.mean():.4f}; minus pass A's: mean {err.mean():+.4f} "
          f"(max |.| {np.abs(err).max():.3f}), minus paired A's: mean {err_paired.mean():+.4f} "
          f"(sd {err_paired.std():.4f}); accuracy {(guess == y).mean():.4f}, "
          f"{(guess != full.argmax(1)).sum()} classifications unlike A's; cost {cost:.2f}x; "
          f"{seconds:.1f}s")


def main(results, n):
    cfg = dataclasses.replace(c.Config(), results_dir=results, validation=True)
    data = c.prepare_data(cfg)
    x, y = data["x_eval"][:n], data["y_eval"][:n]
    g = c.build_graph(cfg)
    with c.tf.Session(graph=g.graph, config=g.session_config) as sess:
        sess.run(g.init)
        g.saver.restore(sess, c.tf.train.latest_checkpoint(results + "/checkpoints"))
        log_prior = sess.run(g.log_prior)
        start = time.time()
        own = c.importance_sampled(sess, g, cfg, x, y, cfg.ll_samples, c.STREAM_EVAL)["log_px"]
        print(f"{n} digits; the log p(x|y) pass: {time.time() - start:.1f}s")
        start = time.time()
        full = log_prior + full_pass(sess, g, cfg, x, STREAM_A)
        paired = full.copy()
        paired[np.arange(n), y] = log_prior[y] + own
        report("full pass A", full, full.argmax(1), full, paired, y, time.time() - start, 10.0)
        start = time.time()
        other = log_prior + full_pass(sess, g, cfg, x, STREAM_B)
        report("full pass B", other, other.argmax(1), full, paired, y, time.time() - start, 10.0)
        srt = np.sort(full, 1)
        print(f"gap best - second label: median {np.median(srt[:, -1] - srt[:, -2]):.1f} nats")
        fed = []
        c.importance_sampled = counting(c.importance_sampled, fed)
        for labels in (1, 2, 3):
            cfg2 = dataclasses.replace(cfg, mixture_labels=labels)
            start = time.time()
            fed.clear()
            joint = c.label_scores(sess, g, cfg2, x, log_prior, known_labels=y, known_log_px=own)
            guess = joint.argmax(1)                       # the classifier's: blind to y
            joint[np.arange(n), y] = log_prior[y] + own    # log p(x) as evaluate takes it
            cost = 1 + sum(fed) / (n * cfg.ll_samples)     # with the log p(x|y) pass
            report(f"MIXTURE_LABELS = {labels}", joint, guess, full, paired, y,
                   time.time() - start, cost)


def counting(sampler, fed):
    """importance_sampled, noting the digit-samples of each call in the list fed."""
    def counted(sess, g, cfg, x, y, n_samples, stream):
        fed.append(len(x) * n_samples)
        return sampler(sess, g, cfg, x, y, n_samples, stream)
    return counted


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
