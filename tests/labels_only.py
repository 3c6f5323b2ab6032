"""The classifier on the labels alone: `python tests/labels_only.py LABELS SEED [STEPS]` (a
script, not a test).

Trains M2's classifier q(y|x) (cvae_mnist.classifier: an MLP of two HIDDEN_UNITS ReLU layers to
ten logits) on nothing but the LABELS labelled digits that `python cvae_mnist.py --labels=LABELS
--seed=SEED` draws, binarized anew at every step, full batch, Adam at LEARNING_RATE: what M2's
classifier would be without the unlabelled digits. Without STEPS, on VALIDATION's split: the
validation error every 250 steps up to 5,000, and the step count with the lowest. With STEPS,
on the full training set's draw: the test error after that many steps.
"""
import argparse
import dataclasses
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cvae_mnist as c  # noqa: E402

tf = c.tf
EVERY, MOST = 250, 5000     # validation: evaluate every EVERY steps, up to MOST


def train(cfg, data, checkpoints):
    """Adam steps on the labelled digits; yields (step, error on the evaluation digits) at each
    step count in checkpoints."""
    x_l = data["x_train"][data["labelled"]]
    y_l = data["y_train"][data["labelled"]]
    rng = np.random.default_rng([cfg.seed, 99])
    graph = tf.Graph()
    with graph.as_default():
        tf.set_random_seed(cfg.seed)
        x = tf.placeholder(tf.float32, [None, c.X_DIM])
        y = tf.placeholder(tf.int32, [None])
        q = c.classifier(x, cfg)
        step = tf.train.AdamOptimizer(cfg.learning_rate).minimize(-tf.reduce_mean(q.log_prob(y)))
        guess = tf.argmax(q.logits, 1, output_type=tf.int32)
        with tf.Session(config=tf.ConfigProto(intra_op_parallelism_threads=cfg.threads)) as sess:
            sess.run(tf.global_variables_initializer())
            for t in range(1, max(checkpoints) + 1):
                binary = (rng.random(x_l.shape, dtype=np.float32) < x_l).astype(np.float32)
                sess.run(step, {x: binary, y: y_l})
                if t in checkpoints:
                    read = sess.run(guess, {x: data["x_eval"]})
                    yield t, float((read != data["y_eval"]).mean())


def main(labels, seed, steps=None):
    validation = steps is None
    cfg = dataclasses.replace(c.Config(), labels=labels, seed=seed, validation=validation,
                              data_dir=os.path.join(os.path.dirname(c.__file__), "data"))
    data = c.prepare_data(cfg)
    if validation:
        errors = dict(train(cfg, data, set(range(EVERY, MOST + 1, EVERY))))
        for t, error in errors.items():
            print(f"{labels} labels, seed {seed}, {t} steps: validation error {error:.4f}")
        best = min(errors, key=errors.get)
        print(f"best: {best} steps, validation error {errors[best]:.4f}")
    else:
        for t, error in train(cfg, data, {steps}):
            print(f"{labels} labels, seed {seed}, {t} steps: test error {error:.4f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("labels", type=int, help="labelled digits, a multiple of 10 (>= 10)")
    parser.add_argument("seed", type=int, help="the SEED that draws them")
    parser.add_argument("steps", type=int, nargs="?", help="train this long, then test")
    args = parser.parse_args()
    if args.labels < 10 or args.labels % 10:
        parser.error("LABELS must be a multiple of 10, at least 10")
    main(args.labels, args.seed, args.steps)
