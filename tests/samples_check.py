"""Do LL_SAMPLES importance samples flatter a model? `python tests/samples_check.py RESULTS_DIR N
SAMPLES [SAMPLES ...]` (a script, not a test).

On the checkpoint of a finished VALIDATION = True run of the CVAE in RESULTS_DIR, and its first
N validation digits, runs the last evaluation (log p(x|y), the label mixture's log p(x), the
accuracy) with each number of importance samples. The estimates are lower bounds that rise
towards log p(x|y) with the samples; a better proposal q (one trained by IWAE, say) is closer
already at few samples, so two models compare fairly only when more samples no longer raise
either by much.
"""
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cvae_mnist as c  # noqa: E402


def main(results, n, samples):
    with c.Model(results) as model:
        data = c.prepare_data(model.cfg)
        x, y = data["x_eval"][:n], data["y_eval"][:n]
        print(f"{results}: {n} validation digits")
        for count in samples:
            cfg = dataclasses.replace(model.cfg, ll_samples=count)
            out = c.evaluate(model.sess, model.g, cfg, x, y, last=True)
            print(f"  {count} samples: log p(x|y) {out['eval_log_px_y']:.3f}, log p(x) "
                  f"{out['eval_log_px']:.3f}, accuracy {out['eval_accuracy']:.4f} "
                  f"({out['eval_seconds']:.0f}s)")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), [int(s) for s in sys.argv[3:]])
