"""The grid writer's layout, and what each figure puts in each row and column."""
import dataclasses

import numpy as np
import pytest
from PIL import Image

import cvae_mnist as cm

PITCH = 30  # a 28-pixel tile plus a 2-pixel gutter
# A tile against the same digit decoded alone: another batch size may sum the 32-unit layers in
# another order, a few float32 roundings (u = 6e-8) of logits of a few units, and the sigmoid's
# slope is at most 1/4, so the pixels agree to about 1e-6; 1e-5 leaves a margin
PIXEL_ATOL = 1e-5


def tile(image, r, c):
    return image[2 + r * PITCH:2 + r * PITCH + 28, 2 + c * PITCH:2 + c * PITCH + 28]


def test_grid_layout_row_order_and_range(tmp_path):
    values = np.arange(30, dtype=np.float32).reshape(10, 3, 1) / 29       # tile (r, c) is flat
    tiles = np.broadcast_to(values, (10, 3, 784))
    image = cm.tile_grid(tiles)
    assert image.shape == (302, 92) and image.dtype == np.uint8
    for r in range(10):
        for c in range(3):
            assert (tile(image, r, c) == round(255 * values[r, c, 0])).all()
    gutter = np.ones_like(image, bool)
    for r in range(10):
        for c in range(3):
            gutter[2 + r * PITCH:2 + r * PITCH + 28, 2 + c * PITCH:2 + c * PITCH + 28] = False
    assert (image[gutter] == cm.GRID_GAP_LEVEL).all()
    assert tile(image, 0, 0).max() == 0 and tile(image, 9, 2).min() == 255   # ink is bright


def test_grid_png_of_ten_columns_is_302_square(tmp_path):
    path = tmp_path / "g.png"
    cm.save_png(cm.tile_grid(np.random.default_rng(0).random((10, 10, 784))), str(path))
    with Image.open(path) as img:
        assert img.size == (302, 302) and img.mode == "L"


@pytest.fixture(scope="module")
def model(mnist):
    cfg = dataclasses.replace(cm.Config(), z_dim=4, hidden_units=32, samples_per_class=3)
    g = cm.build_graph(cfg)
    sess = cm.tf.Session(graph=g.graph)
    sess.run(g.init)
    x, y = cm.binarize(mnist["x_test"][:300], 0), mnist["y_test"][:300]
    yield sess, g, cfg, x, y
    sess.close()


def decode(model, z, label):
    sess, g = model[:2]
    return cm._decode(sess, g, np.atleast_2d(z), [label])[0]


def encode(model, x, label):
    sess, g = model[:2]
    return cm._encode(sess, g, x[None], [label])[0]


@pytest.fixture(scope="module")
def grids(model):
    sess, g, cfg, x, y = model
    return cm.digit_grids(sess, g, cfg, x, y)


def test_grids_have_ten_rows_and_their_columns(grids):
    assert {name: tiles.shape for name, tiles in grids.items()} == {
        "cvae": (10, 3, 784), "recon": (10, 10, 784), "interp": (10, 10, 784),
        "style": (10, 11, 784), "style_prior": (10, 10, 784)}


def test_sample_grid_row_k_is_digit_k(model, grids):
    cfg = model[2]
    z = cm.random_generator(cfg.seed, cm.STREAM_FIGURES, 0).standard_normal((30, cfg.z_dim))
    np.testing.assert_allclose(grids["cvae"][7, 2], decode(model, z[7 * 3 + 2], 7), atol=PIXEL_ATOL)
    np.testing.assert_allclose(grids["cvae"][0, 0], decode(model, z[0], 0), atol=PIXEL_ATOL)


def test_style_grid_first_column_is_the_input_then_labels_0_to_9(model, grids):
    x, y = model[3:]
    for k in (0, 4, 9):
        i = np.flatnonzero(y == k)[0]
        np.testing.assert_array_equal(grids["style"][k, 0], x[i])
        z = encode(model, x[i], k)
        for label in (0, 6):
            np.testing.assert_allclose(grids["style"][k, 1 + label], decode(model, z, label),
                                       atol=PIXEL_ATOL)


def test_fixed_z_grid_uses_one_z_per_row(model, grids):
    cfg = model[2]
    z = cm.random_generator(cfg.seed, cm.STREAM_FIGURES, 1).standard_normal((10, cfg.z_dim))
    for r in (0, 5):
        for label in (1, 8):
            np.testing.assert_allclose(grids["style_prior"][r, label], decode(model, z[r], label),
                                       atol=PIXEL_ATOL)
    assert not np.allclose(grids["style_prior"][0, 3], grids["style_prior"][1, 3])


def test_reconstruction_grid_alternates_digit_and_reconstruction(model, grids):
    x, y = model[3:]
    i = np.flatnonzero(y == 3)[:5]
    np.testing.assert_array_equal(grids["recon"][3, 0::2], x[i])
    np.testing.assert_allclose(grids["recon"][3, 3], decode(model, encode(model, x[i[1]], 3), 3),
                               atol=PIXEL_ATOL)


def test_interpolation_grid_runs_from_one_digit_to_another(model, grids):
    x, y = model[3:]
    a, b = np.flatnonzero(y == 5)[:2]
    np.testing.assert_array_equal(grids["interp"][5, 0], x[a])
    np.testing.assert_array_equal(grids["interp"][5, -1], x[b])
    np.testing.assert_allclose(grids["interp"][5, 1], decode(model, encode(model, x[a], 5), 5),
                               atol=PIXEL_ATOL)
    np.testing.assert_allclose(grids["interp"][5, -2], decode(model, encode(model, x[b], 5), 5),
                               atol=PIXEL_ATOL)


def test_vae_figures_are_samples_reconstructions_and_interpolations(mnist, tmp_path):
    cfg = dataclasses.replace(cm.Config(), z_dim=4, hidden_units=32, conditional=False,
                              results_dir=str(tmp_path))
    g = cm.build_graph(cfg)
    x, y = cm.binarize(mnist["x_test"][:300], 0), mnist["y_test"][:300]
    data = dict(x_figures=x, y_figures=y, x_eval=x, y_eval=y)
    with cm.tf.Session(graph=g.graph) as sess:
        sess.run(g.init)
        pngs = cm.save_figures(sess, g, cfg, 3, data, {})
    assert sorted(pngs) == ["interp", "recon", "vae", "vae_latent"]
    assert sorted(p.name for p in tmp_path.iterdir()) == \
        ["interp.epoch.3.png", "recon.epoch.3.png", "vae.epoch.3.png", "vae_latent.epoch.3.png"]
