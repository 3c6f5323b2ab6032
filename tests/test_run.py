"""End-to-end runs of main(): outputs, resuming, crashes, bad settings, NaN."""
import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
from PIL import Image

import cvae_mnist as cm
from conftest import ROOT, our_stderr, small_config


@pytest.fixture(scope="module")
def finished(small_data_dir, tmp_path_factory):
    """An uninterrupted 2-epoch run on real digits: (results dir, metrics rows, stdout)."""
    results = tmp_path_factory.mktemp("finished")
    cfg = small_config(small_data_dir, results, epochs=2)
    rows, out = run_main(cfg)
    return results, rows, out


def run_main(cfg):
    """main(cfg) with its stdout captured: (metrics rows, printed text)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rows = cm.main(cfg)
    return rows, buf.getvalue()


@pytest.mark.filterwarnings("error::RuntimeWarning")      # numpy's "Mean of empty slice"
@pytest.mark.parametrize("digits", [1, 2])
def test_one_or_two_evaluation_digits_evaluate_and_draw(small_data_dir, tmp_path, digits):
    """TEST_LIMIT = 1: no centroid score or active units (each needs two digits), said by
    blanks and missing lines, not NaN; the latent picture is skipped with a word. Two digits
    give both numbers and the picture."""
    rows, out = run_main(small_config(small_data_dir, tmp_path, test_limit=digits))
    row = rows[-1]
    assert np.isfinite([row["eval_elbo"], row["eval_log_px_y"], row["eval_log_px"]]).all()
    assert row["eval_digits"] == digits and "nan" not in out.lower()
    latent = (tmp_path / "cvae_latent.epoch.1.png").exists()
    if digits == 1:
        assert row["eval_centroid_accuracy"] is None and row["active_units"] is None
        assert "Active units" not in out and "centroid" not in out
        assert ">> (1 test digit, 20 importance samples each, " in out
        assert "The latent picture needs two test digits or more: not drawn" in out
        assert not latent
    else:
        assert row["eval_centroid_accuracy"] in (0, 1) and 0 <= row["active_units"] <= 8
        assert ">> (2 test digits, " in out and latent


def test_end_to_end_writes_grids_and_improves(finished):
    results, rows, out = finished
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[1]["train_elbo"] > rows[0]["train_elbo"]
    assert rows[1]["eval_elbo"] > rows[0]["eval_elbo"]
    assert rows[0]["ll_samples"] == 5 and rows[1]["ll_samples"] == 20   # full K at the end
    assert all(r["eval_log_px_y"] > r["eval_elbo"] for r in rows)
    assert [r["eval_set"] for r in rows] == ["test", "test"]
    # the label mixture and the classifier come with the last evaluation only
    assert rows[0]["eval_log_px"] is None and rows[0]["eval_accuracy"] is None
    assert 0 < rows[1]["eval_accuracy"] <= 1 and 1 <= rows[1]["active_units"] <= 8
    # log p(x) >= log p(y) + log p(x|y) for each digit, so on average too
    assert rows[1]["eval_log_px"] > rows[1]["eval_log_px_y"] + np.log(0.05)
    text = (results / "metrics.csv").read_text()
    assert not re.search(r"\.\d{5}", text)                      # values to at most 4 decimals
    assert [line.split(",")[0] for line in text.splitlines()[1:]] == ["1", "2"]
    assert re.search(r"^Epoch 2 \(\d+\.\d+s\): Lower bound = -\d+\.\d\d", out, re.M)
    assert re.search(r"^>> Test lower bound = -\d+\.\d\d$", out, re.M)
    assert re.search(r"^>> Test log p\(x\|y\) \(IS\) = -\d+\.\d\d$", out, re.M)
    assert re.search(r"^>> Test log p\(x\) \(label mixture, IS\) = -\d+\.\d\d$", out, re.M)
    assert re.search(r"^>> Test accuracy of argmax_y p\(y\|x\) = 0\.\d{4}$", out, re.M)
    assert re.search(r"^>> Active units = \d+ of 8$", out, re.M)
    for name in ["cvae", "style", "style_prior", "recon", "interp"]:
        with Image.open(results / f"{name}.epoch.2.png") as img:
            assert img.mode == "L" and img.size[1] == 302
    with Image.open(results / "cvae.epoch.2.png") as img:
        assert img.size == (302, 302)
    with Image.open(results / "cvae_latent.epoch.2.png") as img:
        assert img.mode == "RGB"
    assert list(results.glob("tensorboard/cvae/events.out.tfevents.*"))


def test_tensorboard_events_hold_scalars_and_images(finished):
    results = finished[0]
    tags = set()
    for path in results.glob("tensorboard/cvae/events.out.tfevents.*"):
        for event in cm.tf.train.summary_iterator(str(path)):
            tags |= {v.tag for v in event.summary.value}
    assert {"train/elbo", "train/kl", "test/elbo", "test/log_px_given_y", "test/log_px",
            "test/accuracy", "test/active_units", "time/epoch_seconds", "figures/cvae",
            "figures/style", "figures/cvae_latent"} <= tags


def test_finished_run_says_so_and_does_not_train(finished, small_data_dir):
    results, rows, _ = finished
    again, out = run_main(small_config(small_data_dir, results, epochs=2))
    assert "already holds a finished run of 2 epochs" in out
    assert again == rows


def test_resumed_run_matches_uninterrupted_one(finished, small_data_dir, tmp_path):
    run_main(small_config(small_data_dir, tmp_path, epochs=1))
    rows, out = run_main(small_config(small_data_dir, tmp_path, epochs=2))
    assert "epochs 2..2" in out and "Epoch 1 " not in out
    train_columns = ["epoch", "train_elbo", "train_recon", "train_kl"]
    for got, want in zip(rows, finished[1], strict=True):
        for key in train_columns:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-3), key
    # epoch 1 was the last of the first part, so it was evaluated with the full K there
    assert rows[0]["ll_samples"] == 20 and finished[1][0]["ll_samples"] == 5
    for key in ["eval_elbo", "eval_log_px_y", "eval_log_px", "eval_accuracy"]:
        assert rows[1][key] == pytest.approx(finished[1][1][key], rel=1e-5, abs=1e-3), key


def test_damaged_latest_checkpoint_falls_back_to_the_one_before(finished, small_data_dir,
                                                                 tmp_path, capfd):
    shutil.copytree(finished[0], tmp_path, dirs_exist_ok=True)
    data = tmp_path / "checkpoints" / "ckpt-2.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:100])         # a save cut short
    rows, out = run_main(small_config(small_data_dir, tmp_path, epochs=2))
    assert "unreadable" in capfd.readouterr().err
    assert "epochs 2..2" in out
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[1]["train_elbo"] == pytest.approx(finished[1][1]["train_elbo"], rel=1e-5)


def test_other_model_shape_is_refused(finished, small_data_dir, tmp_path):
    shutil.copytree(finished[0], tmp_path, dirs_exist_ok=True)
    with pytest.raises(cm.UserError, match="RESUME = False"):
        cm.main(small_config(small_data_dir, tmp_path, epochs=3, z_dim=9))


def test_resume_false_starts_fresh(finished, small_data_dir, tmp_path):
    shutil.copytree(finished[0], tmp_path, dirs_exist_ok=True)
    rows, out = run_main(small_config(small_data_dir, tmp_path, epochs=1, resume=False))
    assert "epochs 1..1" in out and [r["epoch"] for r in rows] == [1]
    assert not list(tmp_path.glob("checkpoints/ckpt-2*"))


@pytest.mark.parametrize("change, words", [
    (dict(epochs=0), "EPOCHS"), (dict(batch_size=0), "BATCH_SIZE"),
    (dict(batch_size=5000), "BATCH_SIZE = 5000 is larger"), (dict(z_dim=0), "Z_DIM"),
    (dict(learning_rate=0.0), "LEARNING_RATE"), (dict(learning_rate=-1e-3), "LEARNING_RATE"),
    (dict(mixture_labels=0), "MIXTURE_LABELS"), (dict(mixture_labels=11), "MIXTURE_LABELS"),
    (dict(results_dir="/proc/no/such/dir"), "RESULTS_DIR"),
])
def test_bad_constants_are_refused_before_work(small_data_dir, tmp_path, change, words):
    cfg = dataclasses.replace(small_config(small_data_dir, tmp_path / "r"), **change)
    with pytest.raises(cm.UserError, match=re.escape(words)):
        cm.main(cfg)
    assert not (tmp_path / "r" / "checkpoints").exists()


def cli_command(cfg):
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    return [sys.executable, "-c", "import sys, cvae_mnist as c; "
            f"sys.exit(c.cli(c.Config(**{fields!r})))"]


def test_cli_prints_one_line_without_traceback(small_data_dir, tmp_path):
    proc = subprocess.run(cli_command(small_config(small_data_dir, tmp_path, epochs=-1)),
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == \
        "error: EPOCHS = -1: it must be a whole number >= 1"


def test_bad_data_fails_fast_with_exactly_one_line(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mnist.pkl.gz").write_text("<!DOCTYPE html><html>404</html>")
    cfg = small_config(tmp_path / "data", tmp_path / "results")
    proc = subprocess.run(cli_command(cfg), capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1 and proc.stdout == ""
    lines = our_stderr(proc.stderr).splitlines()         # before any graph is built
    assert len(lines) == 1 and lines[0].startswith("error: ") and "web page" in lines[0]


def test_settings_from_the_command_line(small_data_dir, tmp_path):
    cfg = cm.parse_args(["--epochs=2", "--conditional=False", "--learning_rate=5e-4",
                         f"--results_dir={tmp_path}", '--my_digits=["a.png"]'])
    assert (cfg.epochs, cfg.conditional, cfg.learning_rate) == (2, False, 5e-4)
    assert cfg.results_dir == str(tmp_path) and cfg.my_digits == ["a.png"]
    assert cm.parse_args([]) == cm.Config()
    for argv, words in [(["--epoch=2"], "unrecognized arguments: --epoch=2"),
                        (["--epochs=two"], "EPOCHS = 'two': it must be a whole number >= 1"),
                        (["--conditional=maybe"], "CONDITIONAL = 'maybe': it must be True or")]:
        proc = subprocess.run([sys.executable, "cvae_mnist.py", *argv], capture_output=True,
                              text=True, cwd=ROOT)
        lines = our_stderr(proc.stderr).splitlines()
        assert proc.returncode == 1 and len(lines) == 1, proc.stderr
        assert lines[0].startswith("error: ") and words in lines[0], lines[0]
    proc = subprocess.run([sys.executable, "cvae_mnist.py", "--help"], capture_output=True,
                          text=True, cwd=ROOT)
    words = " ".join(proc.stdout.split())
    assert proc.returncode == 0 and "constant at the top of cvae_mnist.py" in words
    assert "--z_dim VALUE a whole number >= 1; now 40" in words


@pytest.mark.parametrize("epoch, message", [
    (2, r"the loss is not finite at epoch 2, step 1/4 \(elbo = nan, recon = nan\); epochs "
        r"1\.\.1 are saved in .*/: lower LEARNING_RATE and run again to resume"),
    (1, r"the loss is not finite at epoch 1, step 1/4 \(elbo = nan, recon = nan\); no epoch "
        r"is saved in .*/ yet: lower LEARNING_RATE and run again")])
def test_nan_stops_with_epoch_and_step_and_says_what_is_saved(mnist, epoch, message):
    cfg = dataclasses.replace(cm.Config(), z_dim=4, hidden_units=32)
    g = cm.build_graph(cfg)
    with g.graph.as_default():
        bias, = [v for v in cm.tf.global_variables() if v.op.name == "decoder/logits/b"]
        poison = cm.tf.assign(bias, np.full(784, np.nan, np.float32))
    with cm.tf.Session(graph=g.graph) as sess:
        sess.run(g.init)
        sess.run(g.data.load, {g.data.x_all: mnist["x_train"][:512],
                               g.data.y_all: mnist["y_train"][:512]})
        for before in range(1, epoch):
            cm.train_epoch(sess, g, cfg, before, 512)
        sess.run(poison)
        with pytest.raises(cm.UserError, match=f"^{message}$"):
            cm.train_epoch(sess, g, cfg, epoch, 512)


def test_divergence_names_the_quantity_that_is_not_finite():
    # M2's loss is -U - M + ALPHA xent: an infinite xent alone leaves both bounds finite.
    stats = dict(unlabelled=np.float32(-100.0), labelled=np.float32(-90.0),
                 xent=np.float32(np.inf))
    error = cm.diverged(cm.Config(results_dir="somewhere"), 3, "step 2/4", stats)
    assert str(error).startswith("the loss is not finite at epoch 3, step 2/4 (xent = inf); "
                                 "epochs 1..2 are saved in "), str(error)


def wait_for_rows(path, n, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) > n:
            return
        time.sleep(0.02)
    raise AssertionError(f"no {n} rows in {path} (exit {proc.poll()})")


def long_epochs(data_dir, results, epochs):
    """Epochs of 160 small steps, long enough to be killed in the middle of one."""
    return small_config(data_dir, results, epochs=epochs, batch_size=8, save_freq=10,
                        test_freq=10, test_limit=100)


def test_killed_run_resumes_without_lost_or_repeated_epochs(small_data_dir, tmp_path):
    proc = subprocess.Popen(cli_command(long_epochs(small_data_dir, tmp_path, 4)), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    wait_for_rows(tmp_path / "metrics.csv", 2, proc)        # header + epoch 1 written
    proc.kill()                                               # like kill -9 or a power cut
    proc.wait()
    resumed = subprocess.run(cli_command(long_epochs(small_data_dir, tmp_path, 4)), cwd=ROOT,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    first = int(re.search(r"epochs (\d+)\.\.4", resumed.stdout).group(1))
    assert first >= 2
    assert re.findall(r"^Epoch (\d+) ", resumed.stdout, re.M) == [str(e) for e in range(first, 5)]
    rows = cm.read_metrics(str(tmp_path / "metrics.csv"))
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    reference, _ = run_main(long_epochs(small_data_dir, tmp_path / "ref", 4))
    for got, want in zip(rows, reference):
        assert got["train_elbo"] == pytest.approx(want["train_elbo"], rel=1e-5)


def test_ctrl_c_exits_cleanly_with_one_line(small_data_dir, tmp_path):
    # a shell starts background jobs with SIGINT ignored, and Python then keeps it
    # ignored: give the run the default a terminal gives, wherever the tests run
    proc = subprocess.Popen(cli_command(long_epochs(small_data_dir, tmp_path, 50)), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for_rows(tmp_path / "metrics.csv", 2, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(r"error: interrupted in epoch \d+; epochs 1\.\.\d+ are saved in .*: "
                        r"run again to resume", last)
    assert (tmp_path / "checkpoints" / "checkpoint").exists()


def test_vae_measures_log_px_and_draws_no_label_figures(small_data_dir, tmp_path):
    rows, out = run_main(small_config(small_data_dir, tmp_path, conditional=False))
    last = rows[-1]
    assert last["eval_log_px"] > last["eval_elbo"]
    assert "eval_log_px_y" not in last and "eval_accuracy" not in last
    assert re.search(r"^>> Test log p\(x\) \(IS\) = -\d+\.\d\d$", out, re.M)
    assert "Training the VAE p(x|z) q(z|x)" in out and "|y)" not in out and "z,y" not in out
    assert sorted(p.name for p in tmp_path.glob("*.epoch.1.png")) == \
        ["interp.epoch.1.png", "recon.epoch.1.png", "vae.epoch.1.png", "vae_latent.epoch.1.png"]


def test_checkpoint_of_the_other_kind_is_refused(finished, small_data_dir, tmp_path):
    shutil.copytree(finished[0], tmp_path, dirs_exist_ok=True)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(cm.UserError, match=re.escape(
            "made with CONDITIONAL = True; this run has CONDITIONAL = False")):
        cm.main(small_config(small_data_dir, tmp_path, epochs=3, conditional=False))
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_validation_holds_out_the_last_training_digits_and_never_reads_test(mnist, tmp_path):
    from test_data import as_uint8, write_idx
    data = tmp_path / "data"
    data.mkdir()
    n = cm.VALIDATION_SIZE + 1280
    x, y = as_uint8(mnist["x_train"][:n]), mnist["y_train"][:n]
    write_idx(data, x, y, "train")                 # no test files at all: none is needed
    cfg = small_config(data, tmp_path / "r", validation=True, test_limit=200)
    split = cm.prepare_data(cfg)
    pixels = x.reshape(n, 784) / np.float32(255)
    np.testing.assert_array_equal(split["x_train"], pixels[:1280])
    np.testing.assert_array_equal(split["x_eval"],
                                  cm.binarize(pixels[1280:], cm.EVAL_SET_KEY)[:200])
    rows, out = run_main(cfg)
    assert rows[-1]["eval_set"] == "validation"
    assert "evaluating on 200 validation digits" in out
    assert re.search(r"^>> Validation log p\(x\) \(label mixture, IS\) = -\d+", out, re.M)
    assert "Test" not in out
    with pytest.raises(cm.UserError, match="t10k-images"):           # a test run needs them
        cm.prepare_data(dataclasses.replace(cfg, validation=False))


def test_evaluation_digits_do_not_depend_on_seed(small_data_dir, tmp_path):
    one = cm.prepare_data(small_config(small_data_dir, tmp_path, seed=1))
    two = cm.prepare_data(small_config(small_data_dir, tmp_path, seed=2))
    np.testing.assert_array_equal(one["x_eval"], two["x_eval"])


def test_every_use_of_randomness_has_its_own_key():
    keys = {tuple(cm.random_key(7, stream, index)) for stream in range(6) for index in range(50)}
    assert len(keys) == 300
    order = cm.random_generator(7, cm.STREAM_ORDER, 1).standard_normal(5)
    grid = cm.random_generator(7, cm.STREAM_FIGURES, 1).standard_normal(5)
    assert not np.allclose(order, grid)


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_long_evaluations_show_progress_on_a_terminal_only(trained, monkeypatch, capsys):
    """An evaluation pass rewrites one line in place on a terminal (share done, time left) and
    clears it; redirected, it prints nothing. PROGRESS_AFTER = 0 so that a short pass shows."""
    monkeypatch.setattr(cm, "PROGRESS_AFTER", 0.0)
    with cm.load(str(trained[0])) as model:
        x = np.random.default_rng(0).integers(0, 2, (40, 784)).astype(np.float32)
        model.log_likelihood(x, [3] * 40, samples=2000)             # redirected: capsys
        assert capsys.readouterr().out == ""
        monkeypatch.setattr(sys, "stdout", Terminal())
        model.log_likelihood(x, [3] * 40, samples=2000)
        shown = sys.stdout.getvalue()
    assert re.search(r"\rImportance sampling: \d+% done, \d+s left", shown)
    last = shown.rsplit("\r", 3)[1]                                 # the last line shown ...
    assert shown.endswith("\r" + " " * len(last) + "\r")          # ... cleared for the next


def test_an_interrupted_pass_clears_its_progress_line_before_the_error(monkeypatch):
    """Ctrl-C in the third batch of a pass: the line is cleared as the interrupt leaves the
    pass, so that the error line starts on a clean line (the exception's traceback would keep
    the generator, and its clean-up, alive until the program ends)."""
    class Session:
        calls = 0

        def run(self, fetches, feed):
            self.calls += 1
            if self.calls == 3:
                raise KeyboardInterrupt
            return np.zeros(2), np.zeros(2)
    g = types.SimpleNamespace(log_px=1, test_elbo=2, x_in=3, y_in=4, k_in=5, seed_in=6)
    cfg = dataclasses.replace(cm.Config(), test_batch_size=2, ll_samples=10)
    monkeypatch.setattr(cm, "PROGRESS_AFTER", 0.0)
    monkeypatch.setattr(sys, "stdout", Terminal())
    shown = None
    try:
        cm.importance_sampled(Session(), g, cfg, np.zeros((10, 784)), np.zeros(10), 10,
                              cm.STREAM_EVAL)
    except KeyboardInterrupt:
        shown = sys.stdout.getvalue()       # where cli() prints the error: the traceback alive
    assert "\rImportance sampling: 20% done" in shown
    assert shown.endswith("\r" + " " * len(shown.rsplit("\r", 3)[1]) + "\r")


def test_progress_reaches_a_pseudo_terminal_after_progress_after_seconds():
    """The same through a real (pseudo-)terminal, as a user's shell gives one; a pass shorter
    than PROGRESS_AFTER shows nothing."""
    if not hasattr(os, "openpty"):
        pytest.skip("no pseudo-terminals here (Windows)")
    code = ("import time, cvae_mnist as c; list(c.progress(range(3), 'Short')); "
            "c.PROGRESS_AFTER = 0; "
            "[time.sleep(0.05) for _ in c.progress(range(4), 'Label mixture, every label')]")
    leader, follower = os.openpty()
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, stdout=follower,
                          stderr=subprocess.DEVNULL)
    os.close(follower)
    shown = b""
    with contextlib.suppress(OSError):                  # EIO at the end, on Linux
        chunk = os.read(leader, 1024)
        while chunk:
            shown += chunk
            chunk = os.read(leader, 1024)
    os.close(leader)
    assert proc.returncode == 0
    assert re.search(rb"\rLabel mixture, every label: 75% done, 0s left", shown)
    assert b"Short" not in shown


def test_metrics_of_older_versions_read_back_with_whole_counts(tmp_path):
    """Older versions wrote every row but the newest as floats (epoch 1.0): counts read back
    as whole numbers, so a resumed old run's metrics.csv is rewritten with them."""
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,seconds,active_units,eval_elbo\n1.0,2.5,13.0,-90.5\n2,2.4,14,\n")
    rows = cm.read_metrics(str(path))
    assert rows == [dict(epoch=1, seconds=2.5, active_units=13, eval_elbo=-90.5),
                    dict(epoch=2, seconds=2.4, active_units=14, eval_elbo=None)]
    assert {type(r[key]) for r in rows for key in ("epoch", "active_units")} == {int}


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


def test_a_run_from_before_precision_went_resumes_redraws_and_loads(small_data_dir, tmp_path):
    """settings.json from a version with PRECISION (its value, the precision trained in and a
    change of it on resuming): the keys are ignored, and the run goes on as any other."""
    run_main(small_config(small_data_dir, tmp_path, epochs=1))
    path = tmp_path / "checkpoints" / "settings.json"
    older = json.loads(path.read_text())
    older.update(precision="auto", trained_in="bfloat16",
                 changes=[dict(epoch=1, settings=dict(precision=["float32", "bfloat16"]))])
    path.write_text(json.dumps(older))
    rows, out = run_main(small_config(small_data_dir, tmp_path, epochs=2))
    assert out.startswith("Training the CVAE") and "epochs 2..2" in out.splitlines()[0]
    assert [r["epoch"] for r in rows] == [1, 2]
    rows, out = run_main(small_config(small_data_dir, tmp_path, epochs=2))
    assert "already holds a finished run of 2 epochs: drew its" in out
    with cm.load(str(tmp_path)) as model:
        assert model.sample(4, 3).shape == (3, 28, 28)
    settings = json.loads(path.read_text())
    assert "trained_in" not in settings and "precision" not in settings
    assert settings["changes"] == older["changes"]        # the history is kept as it was
