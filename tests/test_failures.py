"""Nothing lost, nothing hidden: bad constants, failed writes, a second run on the same
folder, SIGTERM, file modes, fresh starts and the messages that say what is saved."""
import contextlib
import dataclasses
import errno
import io
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

import cvae_mnist as cm
from conftest import ROOT, small_config, write_small_pkl, our_stderr
from test_run import cli_command, long_epochs, wait_for_rows


@pytest.mark.parametrize("change, words", [
    (dict(seed=-5), "SEED = -5: it must be a whole number in 0..2147483647"),
    (dict(seed="abc"), "SEED = 'abc'"), (dict(seed=2 ** 31), "SEED = 2147483648"),
    (dict(seed=1.5), "SEED = 1.5"), (dict(seed=True), "SEED = True"),
    (dict(resume="False"), "RESUME = 'False': it must be True or False"),
    (dict(download=1), "DOWNLOAD = 1: it must be True or False"),
    (dict(analytic_kl=None), "ANALYTIC_KL = None"), (dict(conditional=0), "CONDITIONAL = 0"),
    (dict(validation="yes"), "VALIDATION = 'yes'"),
    (dict(learning_rate=True), "LEARNING_RATE = True"),
    (dict(learning_rate="1e-3"), "LEARNING_RATE = '1e-3'"),
    (dict(ema_decay="0.9"), "EMA_DECAY = '0.9'"), (dict(ema_decay=float("nan")), "EMA_DECAY = nan"),
    (dict(threads=True), "THREADS = True"), (dict(train_limit=1.5), "TRAIN_LIMIT = 1.5"),
    (dict(test_limit="0"), "TEST_LIMIT = '0'"), (dict(epochs=2.0), "EPOCHS = 2.0"),
    (dict(data_dir=5), "DATA_DIR = 5: it must be a folder name"),
    (dict(results_dir=None), "RESULTS_DIR = None"), (dict(results_dir=""), "RESULTS_DIR = ''"),
])
def test_bad_types_and_ranges_are_refused_before_work(small_data_dir, tmp_path, change, words):
    cfg = dataclasses.replace(small_config(small_data_dir, tmp_path / "r"), **change)
    with pytest.raises(cm.UserError, match=re.escape(words)):
        cm.main(cfg)
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(cm.Config)])
def test_every_setting_has_its_type_checked(tmp_path, field):
    """A value of the wrong type in any field gets one line naming that constant
    (a string where a number or a boolean belongs, a number where a string does)."""
    wrong = 5 if isinstance(getattr(cm.Config(), field), str) else "5"
    cfg = dataclasses.replace(cm.Config(), **{"results_dir": str(tmp_path), field: wrong})
    with pytest.raises(cm.UserError, match=rf"^{field.upper()} = {re.escape(repr(wrong))}: "):
        cm.validate_config(cfg)


def test_good_settings_pass(tmp_path):
    cm.validate_config(dataclasses.replace(cm.Config(), results_dir=str(tmp_path), seed=0,
                                           learning_rate=1, ema_decay=0))


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)],
                         ids=["022", "027", "077"])
def test_written_files_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    """Atomic writes go through a temporary file; the result gets the mode any new file gets
    under the umask, as does the lock file. A fresh process, so the umask set is its own."""
    code = ("import os, sys, numpy as np, cvae_mnist as c; os.umask(int(sys.argv[2], 8)); "
            "d = sys.argv[1]; c.save_png(np.zeros((4, 4), np.uint8), os.path.join(d, 'a.png')); "
            "c.write_metrics(os.path.join(d, 'metrics.csv'), [dict(epoch=1, seconds=1, "
            "train_elbo=-1, train_recon=-1, train_kl=0)]); "
            "import dataclasses; cfg = dataclasses.replace(c.Config(), results_dir=d); "
            "c.results_lock(cfg).__enter__()")
    subprocess.run([sys.executable, "-c", code, str(tmp_path), f"{umask:o}"], cwd=ROOT, check=True)
    assert sorted(os.listdir(tmp_path)) == [".cvae_mnist.lock", "a.png", "metrics.csv"]
    for name in [".cvae_mnist.lock", "a.png", "metrics.csv"]:
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == mode, name


def run_main(cfg):
    """main(cfg) with its stdout captured: (metrics rows, printed text)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rows = cm.main(cfg)
    return rows, buf.getvalue()


def test_failed_write_is_one_line_naming_the_file_and_the_saved_epochs(small_data_dir, tmp_path):
    """A folder where epoch 2's first figure goes makes its write fail for real (as root
    too); once it is gone, a rerun resumes from epoch 2."""
    (tmp_path / "cvae.epoch.2.png").mkdir()
    with pytest.raises(cm.UserError) as err:
        run_main(small_config(small_data_dir, tmp_path, epochs=2))
    assert str(err.value) == (f"could not write {tmp_path}/cvae.epoch.2.png (Is a directory); "
                              f"epochs 1..1 are saved in {tmp_path}/: fix that and run again "
                              "to resume")
    (tmp_path / "cvae.epoch.2.png").rmdir()
    rows, out = run_main(small_config(small_data_dir, tmp_path, epochs=2))
    assert "epochs 2..2" in out and [r["epoch"] for r in rows] == [1, 2]
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_disk_while_writing_metrics(tmp_path):
    """/dev/full fails every write with ENOSPC, a real full disk, root or not: here where the
    temporary file of metrics.csv's atomic write goes. metrics.csv stays as it was."""
    cfg = dataclasses.replace(cm.Config(), results_dir=str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "checkpoint").write_text(
        'model_checkpoint_path: "ckpt-3"\nall_model_checkpoint_paths: "ckpt-3"\n')
    (tmp_path / "metrics.csv").write_text("epoch,seconds\n1,2\n")
    (tmp_path / ".tmp-metrics.csv").symlink_to("/dev/full")
    with pytest.raises(OSError) as err:
        cm.write_metrics(str(tmp_path / "metrics.csv"),
                         [dict(epoch=4, seconds=1, train_elbo=-1, train_recon=-1, train_kl=0)])
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(tmp_path / "metrics.csv")
    assert (tmp_path / "metrics.csv").read_text() == "epoch,seconds\n1,2\n"
    assert not os.path.lexists(tmp_path / ".tmp-metrics.csv")
    assert str(cm._stopped(cfg, err.value)) == (
        f"could not write {tmp_path}/metrics.csv (No space left on device); epochs 1..3 are "
        f"saved in {tmp_path}/: fix that and run again to resume")


def test_failed_checkpoint_write_is_an_oserror_naming_the_folder(tmp_path):
    """TensorFlow's Saver raises its own errors (here FailedPreconditionError, as
    UnknownError or ResourceExhaustedError on a full disk): they come out as OSError,
    and nothing is claimed saved."""
    cfg = dataclasses.replace(cm.Config(), z_dim=2, hidden_units=8, results_dir=str(tmp_path))
    (tmp_path / "checkpoints" / "checkpoint").mkdir(parents=True)   # the index cannot be replaced
    g = cm.build_graph(cfg)
    with cm.tf.Session(graph=g.graph) as sess:
        sess.run(g.init)
        with pytest.raises(OSError) as err:
            cm.save_checkpoint(sess, g, cfg, 1)
    assert err.value.filename == str(tmp_path / "checkpoints")
    assert err.value.strerror == "Is a directory"
    assert str(cm._stopped(cfg, err.value)) == (
        f"could not write {tmp_path}/checkpoints (Is a directory); no epoch is saved in "
        f"{tmp_path}/ yet: fix that and run again")


def test_tensorflow_disk_full_error_becomes_one_short_oserror():
    message = ("Graph execution error:\n\nDetected at node 'save/SaveV2'\n"
               "/r/checkpoints/ckpt-2.data-00000-of-00001.tempstate17; No space left on device\n"
               "\t [[{{node save/SaveV2}}]]\nHint: If you want to see a list of allocated ...")
    with pytest.raises(OSError) as err:
        with cm._tf_writes("/r/checkpoints"):
            raise cm.tf.errors.ResourceExhaustedError(None, None, message)
    assert (err.value.strerror, err.value.filename) == ("No space left on device", "/r/checkpoints")


def snapshot(folder):
    """Every file under `folder`: {relative path: (bytes, mtime_ns)}."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_second_run_on_a_busy_results_dir_is_refused_and_touches_nothing(small_data_dir,
                                                                         tmp_path):
    results = tmp_path / "r"
    (results / "checkpoints").mkdir(parents=True)
    (results / "checkpoints" / "checkpoint").write_text('model_checkpoint_path: "ckpt-1"\n')
    (results / "metrics.csv").write_text("epoch,seconds\n1,2\n2,3\n")
    (results / "cvae.epoch.1.png").write_bytes(b"png")
    cfg = small_config(small_data_dir, results)
    # another run, as far as the lock can tell: it holds the lock
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; "
         "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); "
         "print('locked', flush=True); time.sleep(60)", cm._paths(cfg)["lock"]],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        before = snapshot(results)
        for resume in (True, False):     # RESUME = False would remove the files above
            start = time.time()
            with pytest.raises(cm.UserError) as err:
                cm.main(dataclasses.replace(cfg, resume=resume))
            assert time.time() - start < 5                     # no data loaded, no TensorFlow
            assert str(err.value) == (f"another run is using {results}/; wait for it to end, or "
                                      "choose another RESULTS_DIR")
        assert snapshot(results) == before
    finally:
        holder.kill()                                          # like kill -9: no clean-up
        holder.wait()
    with cm.results_lock(cfg):                                # the kernel let go of it
        pass


def test_sigterm_stops_like_ctrl_c_with_exit_143_and_resumes(small_data_dir, tmp_path):
    """What `timeout`, job schedulers and container stops send."""
    cfg = long_epochs(small_data_dir, tmp_path, 50)
    proc = subprocess.Popen(cli_command(cfg), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_rows(tmp_path / "metrics.csv", 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    found = re.fullmatch(rf"error: stopped by SIGTERM in epoch (\d+); epochs 1\.\.(\d+) are "
                         rf"saved in {re.escape(str(tmp_path))}/: run again to resume", last)
    assert found, last
    saved = int(found.group(2))
    assert saved >= 1 and int(found.group(1)) in (saved, saved + 1)
    rows, out = run_main(dataclasses.replace(cfg, epochs=saved + 1))
    assert f"epochs {saved + 1}..{saved + 1}" in out
    assert [r["epoch"] for r in rows] == list(range(1, saved + 2))


def test_a_sigterm_whose_raise_python_dropped_stops_the_run_at_the_next_epoch():
    """Python drops an exception raised while a __del__ runs (TensorFlow's objects have them):
    the handler's raise can be lost, and the run must stop all the same."""
    run = cm.Run(cfg=None, data={}, g=None, sess=None, done=2, writer=None)
    epochs = run.epochs(5)
    assert next(epochs) == 3
    cm.Terminated.received = True          # the handler ran; its raise did not arrive
    try:
        with pytest.raises(cm.Terminated):
            next(epochs)
        assert run.epoch == 4               # the epoch the stop's line names
    finally:
        cm.Terminated.received = False


def test_sigterm_handler_is_installed_by_cli_only_and_put_back(small_data_dir, tmp_path):
    assert signal.getsignal(signal.SIGTERM) is not cm.Terminated.handler   # not at import
    before = signal.getsignal(signal.SIGTERM)
    assert cm.cli(small_config(small_data_dir, tmp_path, epochs=0)) == 1
    assert signal.getsignal(signal.SIGTERM) is before


def test_resume_false_removes_every_file_of_the_earlier_run_and_only_those(small_data_dir,
                                                                            tmp_path):
    earlier, fresh = tmp_path / "earlier", tmp_path / "fresh"
    run_main(small_config(small_data_dir, earlier, epochs=2))
    # every file a run writes is one start_fresh knows (a new kind of file must be added there)
    shutil.copytree(earlier, fresh)
    cm.start_fresh(small_config(small_data_dir, fresh))
    assert os.listdir(fresh) == [".cvae_mnist.lock"]
    # and RESUME = False through main: nothing of the earlier run is left beside the new one
    mine = ["notes.txt", "cvae.png", "cvae.epoch.2.png.bak", "old_metrics.csv", "events.txt"]
    for name in mine:
        (earlier / name).write_text("mine")
    (earlier / "cvae.epoch.9.png").mkdir()         # a folder of the user's, whatever its name
    (earlier / ".tmp-abcd1234").write_bytes(b"half a figure")      # left by a kill
    old = set(os.listdir(earlier))
    rows, out = run_main(small_config(small_data_dir, earlier, epochs=1, resume=False, seed=7,
                                      save_freq=5))
    new = set(os.listdir(earlier))
    assert [r["epoch"] for r in rows] == [1] and "epochs 1..1" in out
    rewritten = [".cvae_mnist.lock", "checkpoints", "metrics.csv", "tensorboard"] + [
        f"{name}.epoch.1.png" for name in ["cvae", "style", "style_prior", "recon", "interp",
                                           "cvae_latent"]]
    assert old & new == set(mine + rewritten + ["cvae.epoch.9.png"])
    assert not [n for n in new if n.endswith(".epoch.2.png") or n.startswith(".tmp-")]
    assert len(list(earlier.glob("tensorboard/cvae/events.out.*"))) == 1    # the new run's only
    assert os.listdir(earlier / "checkpoints") and not list(earlier.glob("checkpoints/ckpt-2*"))
    for name in mine:
        assert (earlier / name).read_text() == "mine"
    assert (earlier / "cvae.epoch.9.png").is_dir()


@pytest.mark.parametrize("train_limit, words", [
    (0, "BATCH_SIZE = 64 is larger than the 40 training digits in {data}/; lower it"),
    (10, "BATCH_SIZE = 64 is larger than the 10 training digits; lower it or raise TRAIN_LIMIT"),
    (100, "BATCH_SIZE = 64 is larger than the 40 training digits in {data}/; lower it"),
])
def test_batch_larger_than_the_data_names_the_real_count(tmp_path, mnist, train_limit, words):
    data = tmp_path / "data"
    data.mkdir()
    write_small_pkl(data, mnist, 40, 40)
    cfg = small_config(data, tmp_path / "r", train_limit=train_limit)
    with pytest.raises(cm.UserError) as err:
        cm.prepare_data(cfg)
    assert str(err.value) == words.format(data=data)


def test_messages_name_absolute_folders(tmp_path):
    """DATA_DIR and RESULTS_DIR are relative to the working folder, so the messages say
    which folder that was: run from tmp_path with the default 'data'."""
    code = ("import dataclasses, sys, cvae_mnist as c; "
            "sys.exit(c.cli(dataclasses.replace(c.Config(), download=False)))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 1
    assert our_stderr(proc.stderr).startswith(f"error: no complete MNIST in {tmp_path}/data/; put one of "
                                  f"these into {tmp_path}/data/: mnist.pkl.gz")
    assert not (tmp_path / "data").exists()


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs POSIX file-size limits")
def test_a_full_disk_under_the_events_writer_still_ends_the_run_with_one_line(small_data_dir,
                                                                               tmp_path):
    """tf.summary.FileWriter drops what it cannot write without a word; a full disk must still
    end the run with one line, from the checkpoint write that follows in the same epoch. A
    100 kB limit on any one file (RLIMIT_FSIZE) fails the events file (some 275 kB an epoch here)
    and the checkpoint (1.8 MB), and no figure (60 kB at most)."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)    # a write past it fails, not the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
    proc = subprocess.run(cli_command(small_config(small_data_dir, tmp_path, epochs=2)), cwd=ROOT,
                          capture_output=True, text=True, preexec_fn=limit)
    assert proc.returncode == 1
    assert our_stderr(proc.stderr).splitlines() == [
        f"error: could not write {tmp_path}/checkpoints (File too large); no epoch is saved in "
        f"{tmp_path}/ yet: fix that and run again"]
    events, = tmp_path.glob("tensorboard/cvae/events.out.tfevents.*")
    assert 0 < events.stat().st_size <= 100_000             # cut short at the limit, silently
    assert [r["epoch"] for r in cm.read_metrics(str(tmp_path / "metrics.csv"))] == [1]


def test_the_script_imports_and_runs_where_there_is_no_fcntl(tmp_path):
    """Windows has no fcntl: the import needs none, and the lock takes msvcrt's, or warns where
    the system has neither (as here, with fcntl made unavailable)."""
    code = ("import sys; sys.modules['fcntl'] = None; import dataclasses, cvae_mnist as c; "
            "cfg = dataclasses.replace(c.Config(), results_dir=sys.argv[1])\n"
            "with c.results_lock(cfg): print('held')")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == "held\n"
    assert our_stderr(proc.stderr) == (f"warning: could not lock {tmp_path}/.cvae_mnist.lock (this system "
                           f"offers no file locks); make sure no other run uses {tmp_path}/\n")


def test_the_leftover_of_a_failed_save_goes_with_the_next_save(tmp_path):
    """TensorFlow leaves a save cut short by a full disk as a .tempstate file that nothing
    reads; the next checkpoint removes it, so that the space comes back."""
    cfg = dataclasses.replace(cm.Config(), z_dim=2, hidden_units=8, results_dir=str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    left = tmp_path / "checkpoints" / "ckpt-1.data-00000-of-00001.tempstate2157134796256687541"
    left.write_bytes(b"half a checkpoint")
    g = cm.build_graph(cfg)
    with cm.tf.Session(graph=g.graph) as sess:
        sess.run(g.init)
        cm.save_checkpoint(sess, g, cfg, 1)
    assert not left.exists() and (tmp_path / "checkpoints" / "ckpt-1.index").exists()
