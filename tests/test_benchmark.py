"""The throughput benchmark's parts, at a tiny size: they run, they measure what they
say, and the report computes its ratios within rounds. (The timings themselves are
the benchmark's business, not the tests'.)"""
import dataclasses
import os
import types

import numpy as np

import benchmark as bm
import cvae_mnist as cm


def tiny():
    return dataclasses.replace(cm.Config(), z_dim=4, hidden_units=32, batch_size=16,
                               test_batch_size=2, ll_samples=10, threads=1)


def test_plain_step_trains_the_model_it_claims():
    """The plain-TF reference step is a real training step: with the ELBO's terms and
    Adam its loss (a negative ELBO, in nats per digit) falls on its fixed batch."""
    step = bm.plain_step(cm, tiny(), terms=True, adam=True)
    losses = [step()[1] for _ in range(60)]
    assert 300 < losses[0] < 5000            # 784 Bernoulli pixels from random weights
    assert losses[-1] < 0.8 * losses[0]     # 544 -> 376 nats here


def test_interleaved_rounds_and_ratios(capsys):
    cfg = tiny()
    calls = {"slow": 0}

    def slow():
        calls["slow"] += 1
        bm.time.sleep(0.002)
    runners = {"ceiling": (bm.matmul_ceiling(cm, cfg, cfg.batch_size, backward=True), 1, 3),
               "likelihood": (bm.plain_likelihood(cm, cfg), 20, 2),
               "slow": (slow, 1, 4)}
    rates = bm.interleaved(runners, rounds=3)
    assert calls["slow"] == 2 + 3 * 4                 # two untimed calls, then 3 windows
    assert all(len(r) == 3 and min(r) > 0 for r in rates.values())
    assert max(rates["slow"]) < 500                   # 4 calls of >= 2 ms each per window
    ratios = bm.report("training", "steps/s", rates, "ceiling",
                       {"ceiling": "the ceiling", "slow": "a slow step"})
    assert ratios["ceiling"] == 1.0
    expected = np.median(np.array(rates["slow"]) / np.array(rates["ceiling"]))
    assert ratios["slow"] == expected
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "training (steps/s; median of 3 rounds, ratio to the ceiling):"
    assert out[2].split()[:3] == ["a", "slow", "step"] and out[2].endswith(f"{expected:.2f}")


def test_other_revisions_in_float32_and_the_cpu_line(tmp_path):
    """--against loads another revision of the script as a module of its own (here HEAD's),
    whose epochs the benchmark can run, in float32 where that revision had a PRECISION."""
    old = bm.revision("HEAD", str(tmp_path))
    assert old is not cm and callable(old.train_epoch) and callable(old.build_graph)
    assert os.path.basename(old.__file__) == "cvae_mnist_HEAD.py"
    assert getattr(bm.float32_config(old), "precision", "float32") == "float32"

    @dataclasses.dataclass(frozen=True)
    class Config:                                     # as revisions before 2778ddc's successor
        precision: str = "auto"
        epochs: int = 50
    assert bm.float32_config(types.SimpleNamespace(Config=Config)) == Config("float32", 50)
    assert bm.cpu() and "\n" not in bm.cpu()


def test_the_m2_runner_trains_epochs_of_unlabelled_steps(mnist):
    """The benchmark loads M2's labelled digits apart, as a run does, and steps over the rest."""
    cfg = dataclasses.replace(tiny(), labels=20)
    data = dict(x_train=mnist["x_train"][:400], y_train=mnist["y_train"][:400])
    stats = bm.training_runner(cm, cfg, data)["epoch"]()
    assert sorted(stats) == ["labelled", "unlabelled", "xent"]
    assert np.isfinite(list(stats.values())).all() and stats["unlabelled"] < 0
