"""PRECISION: the training step's multiplies in bfloat16, everything else in float32."""
import dataclasses
import json
import re

import numpy as np
import pytest

import cvae_mnist as cm
from conftest import small_config
from test_model import ancestors
from test_run import run_main

tf = cm.tf


def config(precision, **changes):
    return dataclasses.replace(cm.Config(), z_dim=8, hidden_units=64, batch_size=64, threads=1,
                               precision=precision, **changes)


def ops_of(g, tensor, kind):
    """The ops of type `kind` that `tensor` is computed from."""
    names = ancestors(tensor)
    return [op for op in g.graph.get_operations() if op.type == kind and op.name in names]


def test_bfloat16_multiplies_in_the_step_and_float32_everywhere_else():
    g = cm.build_graph(config("bfloat16"))
    step = ops_of(g, g.train_op, "MatMul")
    # forward: 6 layers; backward: their 6 weight gradients and 5 input gradients (x is data)
    assert len(step) == 17
    assert {op.get_attr("T") for op in step} == {tf.bfloat16}
    stats = list(g.stats.values())
    casts = [op for op in ops_of(g, stats, "Cast") if op.inputs[0].op.type == "ReadVariableOp"]
    assert len(casts) == 6                                 # each weight matrix cast once a step
    with g.graph.as_default():
        assert {v.dtype.base_dtype for v in tf.global_variables()} == {tf.float32, tf.int64}
        assert all(v.dtype.base_dtype == tf.float32 for v in tf.trainable_variables())
    assert {t.dtype for t in stats} == {tf.float32}
    assert {op.get_attr("T") for op in ops_of(g, stats, "BiasAdd")} == {tf.float32}
    assert {op.get_attr("T") for op in ops_of(g, stats, "Softplus")} == {tf.float32}
    for evaluation in (g.log_px, g.x_mean, g.z_mean):     # the evaluation stays float32
        assert {op.get_attr("T") for op in ops_of(g, evaluation, "MatMul")} == {tf.float32}
    plain = cm.build_graph(config("float32"))
    assert {op.get_attr("T") for op in ops_of(plain, list(plain.stats.values()), "MatMul")} == {tf.float32}


def step_stats(mnist, precision, weights=None):
    """The bound of step 0 of epoch 1 on the first 256 digits, and the weights it used."""
    cfg = config(precision)
    g = cm.build_graph(cfg)
    with tf.Session(graph=g.graph, config=g.session_config) as sess:
        sess.run(g.init)
        with g.graph.as_default():
            for v in tf.trainable_variables():
                if weights is not None:
                    v.load(weights[v.op.name], sess)
            weights = {v.op.name: sess.run(v) for v in tf.trainable_variables()}
        sess.run(g.data.load, {g.data.x_all: mnist["x_train"][:256],
                               g.data.y_all: mnist["y_train"][:256]})
        key = cm.random_key(cfg.seed, cm.STREAM_TRAIN, 1)
        sess.run(g.data.prepare, {g.data.order: np.arange(256, dtype=np.int32), g.epoch_key: key})
        stats = sess.run(g.stats, {g.epoch_key: key, g.batch_in_epoch: 0})
        return np.array([stats["elbo"], stats["recon"], stats["kl"]]), weights


# How far bfloat16 may move the step's statistics, from the arithmetic, not from one machine's run.
# Each bfloat16 multiply rounds its output to an 8-bit significand: to nearest (by at most 2^-8
# relative) in oneDNN's kernels on CPUs with avx512_bf16 or amx_bf16, and toward zero (by up to
# 2^-7) in TensorFlow's emulated kernels elsewhere (checked on an AVX2-only EPYC: every output of a
# bfloat16 matmul equals its exact value truncated). Truncation shrinks every magnitude, so its
# errors do not cancel: a value behind L multiplies shrinks by at most L * 2^-7 relative. The
# operands are rounded to nearest (tf.cast): errors of either sign, which average out.
TRUNCATION = 2.0 ** -7
# KL(q || p) is quadratic in the encoder's outputs near an untrained model's q (mu and log sigma
# small), and those come out of 3 multiplies: KL shrinks by at most 2 * 3 * 2^-7 = 4.7% of itself
# (the average truncation, 0.28% a multiply, predicts 1.7%; 1.6% measured with truncation).
KL_RTOL = 2 * 3 * TRUNCATION
# The reconstruction sums 784 pixel terms -softplus((1 - 2x) l); a logit shrunk by dl = -e l moves
# its term by (x - sigmoid(l)) dl = e ((1/2 - x) l + l^2 / 4 + O(l^4)). The first part takes the
# sign of l, either sign as often in an untrained decoder: it cancels. The second does not: with
# e at most 6 * 2^-7 (the decoder's 3 multiplies, and the encoder's 3 behind z), the mean over the
# digits moves by at most 6 * 2^-7 * sum_j l_j^2 / 4, and this test's seeded untrained decoder has
# sum_j l_j^2 / 4 = 1.92 nats a digit (logits of rms 0.099): 0.09 nats (0.014 measured).
RECON_ATOL = 6 * TRUNCATION * 1.92
# What these catch: the bfloat16 step run on other noise eps (-eps: the bound moves 0.22 nats) or
# its 784 pixel terms summed in bfloat16 (0.28 nats); a relative 1e-3 on the bound (0.55 nats)
# caught neither.


def test_a_bfloat16_step_gives_the_float32_bound_within_its_rounding(mnist):
    """Same weights, same batch, same noise: the KL within KL_RTOL, the reconstruction within
    RECON_ATOL, the bound (recon - KL) within the sum of the two."""
    exact, weights = step_stats(mnist, "float32")
    rounded, _ = step_stats(mnist, "bfloat16", weights)
    (bound, recon, kl), (bound16, recon16, kl16) = exact, rounded
    assert bound < -300 and 0.1 < kl < 100                   # an untrained model's bound
    assert abs(kl16 - kl) <= KL_RTOL * kl
    assert abs(recon16 - recon) <= RECON_ATOL
    assert abs(bound16 - bound) <= RECON_ATOL + KL_RTOL * kl
    assert not np.array_equal(rounded, exact)                # the multiplies did change


def test_auto_takes_bfloat16_exactly_where_the_cpu_has_it():
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(re.findall(r"\w+", f.read())) & {"avx512_bf16", "amx_bf16"}
    except OSError:
        flags = set()
    precision, why = cm.training_precision("auto")
    assert precision == ("bfloat16" if flags else "float32")
    assert why.startswith("PRECISION = 'auto': ") and all(flag in why for flag in flags)
    assert cm.training_precision("float32") == ("float32", "PRECISION = 'float32'")


def test_resuming_in_another_precision_says_so_and_trains_on(small_data_dir, tmp_path):
    rows, out = run_main(small_config(small_data_dir, tmp_path, epochs=1, precision="float32"))
    assert "multiplies in float32 (PRECISION = 'float32')" in out.splitlines()[0]
    rows, out = run_main(small_config(small_data_dir, tmp_path, epochs=2, precision="bfloat16"))
    assert out.splitlines()[0] == ("Resuming at epoch 2 with changed settings (epochs 1..1 had "
                                   "the old): PRECISION 'float32' -> 'bfloat16'")
    assert "multiplies in bfloat16 (PRECISION = 'bfloat16')" in out.splitlines()[1]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[1]["train_elbo"] > rows[0]["train_elbo"]
    with open(tmp_path / "checkpoints" / "settings.json") as f:
        settings = json.load(f)
    assert settings["trained_in"] == "bfloat16"
    assert settings["changes"] == [dict(epoch=2, settings=dict(precision=["float32", "bfloat16"]))]
    rows, out = run_main(small_config(small_data_dir, tmp_path, epochs=3, precision="bfloat16"))
    assert "changed settings" not in out                      # same precision: nothing to say


def test_resuming_with_another_learning_rate_names_it_and_keeps_it(small_data_dir, tmp_path):
    run_main(small_config(small_data_dir, tmp_path, epochs=1))
    rows, out = run_main(small_config(small_data_dir, tmp_path, epochs=2, learning_rate=5e-4,
                                      seed=7))
    assert out.splitlines()[0] == ("Resuming at epoch 2 with changed settings (epochs 1..1 had "
                                   "the old): LEARNING_RATE 0.001 -> 0.0005, SEED 1234 -> 7")
    with open(tmp_path / "checkpoints" / "settings.json") as f:
        settings = json.load(f)
    assert settings["learning_rate"] == 5e-4
    assert settings["changes"] == [dict(epoch=2, settings=dict(learning_rate=[1e-3, 5e-4],
                                                                seed=[1234, 7]))]
    rows, out = run_main(small_config(small_data_dir, tmp_path, epochs=3, threads=2,
                                      learning_rate=5e-4, seed=7, test_limit=100))
    assert "changed settings" not in out          # threads and evaluation settings: not named


def test_resuming_with_another_objective_names_it_and_logs_the_new_bound(small_data_dir,
                                                                        tmp_path):
    run_main(small_config(small_data_dir, tmp_path, epochs=1))
    path = tmp_path / "checkpoints" / "settings.json"
    older = json.loads(path.read_text())
    del older["objective"]             # as an earlier version wrote it: it trained the ELBO
    path.write_text(json.dumps(older))
    rows, out = run_main(small_config(small_data_dir, tmp_path, epochs=2, objective="iwae",
                                      train_samples=2))
    assert out.splitlines()[0] == ("Resuming at epoch 2 with changed settings (epochs 1..1 had "
                                   "the old): OBJECTIVE 'elbo' -> 'iwae', TRAIN_SAMPLES 1 -> 2")
    assert "by the IWAE bound" in out.splitlines()[1]
    assert re.search(r"^Epoch 2 \(.*\): IWAE bound \(K = 2\) = ", out, re.M)
    # metrics.csv keeps both bounds' columns, each empty in the other objective's rows
    assert rows[0]["train_iwae"] is None and rows[1]["train_elbo"] is None
    assert np.isfinite(rows[1]["train_iwae"]) and np.isfinite(rows[0]["train_elbo"])
    settings = json.loads(path.read_text())
    assert settings["objective"] == "iwae"
    assert settings["changes"] == [dict(epoch=2, settings=dict(objective=["elbo", "iwae"],
                                                                train_samples=[1, 2]))]


@pytest.mark.parametrize("value", ["float16", "bf16", None])
def test_other_precisions_are_refused(tmp_path, value):
    with pytest.raises(cm.UserError, match=re.escape(
            f"PRECISION = {value!r}: it must be 'float32', 'bfloat16' or 'auto'")):
        cm.validate_config(dataclasses.replace(cm.Config(), results_dir=str(tmp_path),
                                               precision=value))
