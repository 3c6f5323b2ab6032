"""Nothing lost, nothing hidden: bad constants, failed writes, a second run on the same
folder, SIGTERM, file modes, fresh starts and the messages that say what is saved."""
import dataclasses
import os
import re
import stat
import subprocess
import sys

import pytest

import cvae_mnist as cm
from conftest import ROOT, small_config


@pytest.mark.parametrize("change, words", [
    (dict(seed=-5), "SEED = -5: it must be a whole number in 0..2147483647"),
    (dict(seed="abc"), "SEED = 'abc'"), (dict(seed=2 ** 31), "SEED = 2147483648"),
    (dict(seed=1.5), "SEED = 1.5"), (dict(seed=True), "SEED = True"),
    (dict(resume="False"), "RESUME = 'False': it must be True or False"),
    (dict(download=1), "DOWNLOAD = 1: it must be True or False"),
    (dict(analytic_kl=None), "ANALYTIC_KL = None"), (dict(softplus_scale=0), "SOFTPLUS_SCALE = 0"),
    (dict(output_bias_init="yes"), "OUTPUT_BIAS_INIT = 'yes'"),
    (dict(learning_rate=True), "LEARNING_RATE = True"),
    (dict(learning_rate="1e-3"), "LEARNING_RATE = '1e-3'"),
    (dict(ema_decay="0.9"), "EMA_DECAY = '0.9'"), (dict(ema_decay=float("nan")), "EMA_DECAY = nan"),
    (dict(threads=True), "THREADS = True"), (dict(train_limit=1.5), "TRAIN_LIMIT = 1.5"),
    (dict(test_limit="0"), "TEST_LIMIT = '0'"), (dict(epochs=2.0), "EPOCHS = 2.0"),
    (dict(data_dir=5), "DATA_DIR = 5: it must be a folder name in quotes"),
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
    """Atomic writes go through a private (0600) temporary file; the result must not
    keep that mode. A fresh process, so the umask set is its own."""
    code = ("import os, sys, numpy as np, cvae_mnist as c; os.umask(int(sys.argv[2], 8)); "
            "d = sys.argv[1]; c.save_png(np.zeros((4, 4), np.uint8), os.path.join(d, 'a.png')); "
            "c.append_metrics(os.path.join(d, 'metrics.csv'), dict(epoch=1, seconds=1, "
            "train_elbo=-1, train_recon=-1, train_kl=0)); "
            "c._atomic_write(os.path.join(d, 'metrics.csv'), b'epoch\\n')")
    subprocess.run([sys.executable, "-c", code, str(tmp_path), f"{umask:o}"], cwd=ROOT, check=True)
    assert sorted(os.listdir(tmp_path)) == ["a.png", "metrics.csv"]
    for name in ["a.png", "metrics.csv"]:
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == mode, name


def test_umask_is_read_without_changing_it():
    before = os.umask(0o022)
    try:
        assert cm._umask() == 0o022
        assert os.umask(0o022) == 0o022
    finally:
        os.umask(before)
