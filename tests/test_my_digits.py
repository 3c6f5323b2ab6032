"""Your own digits: made MNIST-like, refused with one line when they cannot be, read and redrawn
by a trained run, which also redraws its figures without training again."""
import contextlib
import dataclasses
import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image, ImageDraw

import cvae_mnist as cm
from conftest import small_config


def centre_of_mass(digit):
    image = digit.reshape(28, 28)
    rows, cols = np.indices(image.shape)
    return (rows * image).sum() / image.sum(), (cols * image).sum() / image.sum()


def ink_box(digit):
    rows, cols = np.nonzero(digit.reshape(28, 28) > 0.05)
    return rows.max() - rows.min() + 1, cols.max() - cols.min() + 1


def stroke_image(size, ink, paper, box):
    """A made-up digit: a thick '0' drawn with `ink` on `paper` in the box (left, top, w, h)."""
    image = Image.new("RGBA" if len(paper) == 4 else "RGB", size, paper)
    left, top, w, h = box
    ImageDraw.Draw(image).ellipse([left, top, left + w, top + h], outline=ink, width=max(2, w // 6))
    return image


MADE_UP = {
    "dark on light": dict(size=(120, 90), ink=(20, 20, 30), paper=(235, 230, 220),
                          box=(30, 10, 50, 70)),
    "light on dark": dict(size=(120, 90), ink=(250, 250, 250), paper=(10, 10, 10),
                          box=(30, 10, 50, 70)),
    "ink on transparent": dict(size=(100, 100), ink=(0, 0, 0, 255), paper=(255, 255, 255, 0),
                               box=(20, 15, 40, 70)),
    "off-centre": dict(size=(300, 300), ink=(0, 0, 0), paper=(255, 255, 255),
                       box=(200, 190, 60, 80)),
    "2000x1500 photo": dict(size=(2000, 1500), ink=(40, 35, 60), paper=(200, 195, 180),
                            box=(1200, 300, 400, 900)),
}


@pytest.mark.parametrize("kind", sorted(MADE_UP))
def test_a_made_up_digit_becomes_mnist_like(tmp_path, kind):
    path = tmp_path / "digit.png"
    stroke_image(**MADE_UP[kind]).save(path)
    digit = cm.digit_from_image(str(path))
    assert digit.shape == (784,) and digit.dtype == np.float32
    assert 0 <= digit.min() and digit.max() <= 1 and digit.max() > 0.9     # ink bright, 0..1
    image = digit.reshape(28, 28)
    assert image[[0, -1]].max() == 0 and image[:, [0, -1]].max() == 0     # paper is 0
    assert max(ink_box(digit)) in (19, 20, 21)                 # the long side fits 20 pixels
    assert np.allclose(centre_of_mass(digit), 14, atol=0.5)      # where MNIST's mass is


def test_dark_on_light_and_light_on_dark_give_the_same_digit(tmp_path):
    shapes = {}
    for kind in ("dark on light", "light on dark"):
        stroke_image(**MADE_UP[kind]).save(tmp_path / "d.png")
        shapes[kind] = cm.digit_from_image(str(tmp_path / "d.png"))
    assert np.abs(shapes["dark on light"] - shapes["light on dark"]).mean() < 0.02


def test_a_real_test_digit_saved_large_comes_back_close_and_is_read_as_itself(trained, mnist,
                                                                           tmp_path):
    """MNIST's test digits are themselves 20 x 20 boxes centred by mass: a digit drawn 20 times
    larger as dark ink on white paper comes back near itself, and the trained CVAE reads both
    versions of each digit it reads confidently as the same label."""
    x, y = mnist["x_test"][:40], mnist["y_test"][:40]
    back = []
    for i, digit in enumerate(x):
        page = Image.fromarray(np.round(255 * (1 - digit.reshape(28, 28))).astype(np.uint8))
        page.resize((560, 560), Image.Resampling.BICUBIC).save(tmp_path / f"{i}.png")
        back.append(cm.digit_from_image(str(tmp_path / f"{i}.png")))
    back = np.array(back)
    assert np.abs(back - x).mean() < 0.04                       # pixel values are in [0, 1]
    with cm.load(str(trained[0])) as model:
        p_original, p_back = model.classify(x), model.classify(back)
    sure = (p_original.argmax(1) == y) & (p_original.max(1) > 0.9)
    assert sure.sum() >= 15
    assert (p_back.argmax(1)[sure] == y[sure]).mean() >= 0.9


def write_bad(tmp_path, kind):
    path = tmp_path / f"{kind.replace(' ', '_')}.png"
    if kind == "a folder":
        path.mkdir()
    elif kind == "not an image":
        path.write_text("a shopping list, not a photo")
    elif kind == "blank":
        Image.new("L", (64, 64), 250).save(path)
    elif kind == "too large":
        Image.new("1", (8000, 7000), 1).save(path)              # 56 megapixels, 7 kB of PNG
    return path


BAD = {"missing": "does not exist", "a folder": "is a folder, not an image file",
       "not an image": "is not an image Pillow can read",
       "blank": "is blank: no ink stands out from the paper",
       "too large": "is 8000 x 7000 pixels, over 50 megapixels: too large for a photo of one "
                    "digit; crop or shrink it"}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_a_bad_digit_file_gets_one_line_before_any_work(tmp_path, small_data_dir, kind):
    path = write_bad(tmp_path, kind)
    cfg = small_config(small_data_dir, tmp_path / "results", my_digits=[str(path)])
    with pytest.raises(cm.UserError) as err:
        cm.main(cfg)
    assert str(err.value) == f"MY_DIGITS: {path} {BAD[kind]}" or \
        str(err.value).startswith(f"MY_DIGITS: {path} {BAD[kind]}")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "results" / "checkpoints").exists()


def snapshot(folder):
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_finished_run_redraws_and_reads_my_digits_without_training(trained, tmp_path, mnist):
    results = tmp_path / "results"
    shutil.copytree(trained[0], results)
    digit = Image.fromarray(np.round(255 * (1 - mnist["x_test"][0].reshape(28, 28))).astype(
        np.uint8)).resize((280, 280))
    digit.save(tmp_path / "mine.png")
    records = {k: v for k, v in snapshot(results).items()
               if k == "metrics.csv" or k.startswith(("checkpoints", "tensorboard"))}
    figures = {k: v for k, v in snapshot(results).items() if k.endswith(".epoch.4.png")}
    cfg = dataclasses.replace(trained[1], results_dir=str(results), samples_per_class=4,
                              my_digits=[str(tmp_path / "mine.png")])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rows = cm.main(cfg)
    out = buf.getvalue()
    assert "Epoch" not in out and "already holds a finished run of 4 epochs: drew its" in out
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    now = snapshot(results)
    assert {k: now[k] for k in records} == records               # records untouched
    assert all(now[k][1] > figures[k][1] for k in figures)       # every figure drawn again
    with Image.open(results / "cvae.epoch.4.png") as img:        # with today's settings
        assert img.size == (4 * 30 + 2, 302)
    with Image.open(results / "my_digits.png") as img:
        assert img.size == (11 * 30 + 2, 32)                     # the digit, then y = 0..9
    assert f"My digit {tmp_path / 'mine.png'}: read as 7; p(y|x) = " in out


def test_the_vae_says_in_one_line_that_it_cannot_redraw_digits(small_data_dir, tmp_path, mnist):
    Image.fromarray(np.round(255 * mnist["x_test"][0].reshape(28, 28)).astype(np.uint8)).save(
        tmp_path / "mine.png")
    cfg = small_config(small_data_dir, tmp_path / "r", conditional=False,
                       my_digits=[str(tmp_path / "mine.png")])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        cm.main(cfg)
    assert buf.getvalue().count("MY_DIGITS: the VAE has no label to vary") == 1
    assert not os.path.exists(tmp_path / "r" / "my_digits.png")
