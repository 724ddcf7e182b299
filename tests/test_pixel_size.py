"""The training images' pixel size travels with the model, and predict warns about images of
another one (a model recognises structures at the size in pixels it learnt them)."""

import json

import numpy as np
import pytest
import tifffile
import torch

from cellseg_plugins.engine.data import load_sstem
from cellseg_plugins.engine.image_files import common_pixel_nm, pixel_nm
from conftest import FAST, SSTEM, TINY, checkpoint, cli, tiny_config


def _tiff(path, nm=None, shape=(64, 64), seed=0):
    """A grey TIFF of ``nm`` nm pixels as Fiji writes them (ImageJ unit nm), or uncalibrated."""
    pixels = (np.random.default_rng(seed).random(shape) * 255).astype(np.uint8)
    calibration = {"imagej": True, "resolution": (1 / nm, 1 / nm), "metadata": {"unit": "nm"}} \
        if nm else {}
    tifffile.imwrite(path, pixels, **calibration)
    return path


def test_pixel_sizes_of_files_and_the_one_they_share(tmp_path):
    import mrcfile

    assert pixel_nm(_tiff(tmp_path / "fiji.tif", 4.0)) == pytest.approx(4.0)
    tifffile.imwrite(tmp_path / "cm.tif", np.zeros((8, 8), np.uint8), resolution=(2.5e6, 1e7 / 8),
                     resolutionunit="CENTIMETER")  # 4 × 8 nm: their geometric mean
    assert pixel_nm(tmp_path / "cm.tif") == pytest.approx(np.sqrt(32))
    tifffile.imwrite(tmp_path / "dpi.tif", np.zeros((8, 8), np.uint8), resolution=(300, 300),
                     resolutionunit="INCH")  # a scanner's dpi is no microscope's pixel
    assert pixel_nm(tmp_path / "dpi.tif") is None
    assert pixel_nm(_tiff(tmp_path / "plain.tif")) is None
    with mrcfile.new(tmp_path / "em.mrc") as mrc:
        mrc.set_data(np.zeros((8, 8), np.float32))
        mrc.voxel_size = 46.0  # Å
    assert pixel_nm(tmp_path / "em.mrc") == pytest.approx(4.6)

    assert common_pixel_nm([4.0, 4.05, 3.98]) == 4.0  # the median, all within 2 %
    assert common_pixel_nm([4.0, 4.0, 8.0]) is None  # two magnifications
    assert common_pixel_nm([4.0, None]) is None and common_pixel_nm([]) is None


def test_training_keeps_the_pixel_size_its_training_images_share(tmp_path, capsys):
    """... and `cellseg data info` shows the folder's pixel sizes."""
    from cellseg_plugins.engine.train import Trainer

    for name, sizes, shown in [("same", [4.0] * 5, "pixel size 4 nm\n"),
                               ("mixed", [4.0] * 4 + [8.0], "pixel size 4 nm: 4, 8 nm: 1"),
                               ("unknown", [4.0] * 4 + [None], "pixel size 4 nm: 4, unknown: 1")]:
        for folder in ("images", "masks"):
            (tmp_path / name / folder).mkdir(parents=True)
        for k, nm in enumerate(sizes):
            _tiff(tmp_path / name / "images" / f"s{k}.tif", nm, seed=k)
            tifffile.imwrite(tmp_path / name / "masks" / f"s{k}.tif",
                             (np.arange(64 * 64).reshape(64, 64) % 2).astype(np.uint8))
        trainer = Trainer(tiny_config(tmp_path / name / "run", epochs=1,
                                      data=str(tmp_path / name)))
        trainer.write_config()
        expected = 4.0 if name == "same" else None
        assert trainer.checkpoint()["pixel_nm"] == pytest.approx(expected)
        config = json.loads((tmp_path / name / "run" / "config.json").read_text())
        assert config["pixel_nm"] == pytest.approx(expected)
        code, out, _ = cli(capsys, "data", "info", tmp_path / name)
        assert code == 0 and shown in out, out
    code, _, err = cli(capsys, "train", TINY, "--data", tmp_path / "mixed", "--epochs", "1",
                       "--out", tmp_path / "mixed" / "cli", *FAST)  # fold 0 trains on 4 and 8
    assert code == 0 and "warning: training images of several pixel sizes (4 nm: 2, 8 nm: 1)" \
        in err, err


@pytest.mark.skipif(not SSTEM.is_dir(), reason="needs ../shared/data/sstem")
def test_sstem_images_are_4_6_nm_as_its_readme_says():
    sources = load_sstem("sstem4", root=SSTEM.parent)
    assert sources.pixel_nm == [4.6] * 20


def test_predict_warns_about_an_image_of_another_pixel_size(tmp_path, capsys):
    path, _ = checkpoint(tmp_path, "classic_unet(width=4)")
    ckpt = torch.load(path, weights_only=False)
    torch.save({**ckpt, "pixel_nm": 4.0}, path)  # trained on 4 nm pixels
    (tmp_path / "in").mkdir()
    _tiff(tmp_path / "in" / "coarse.tif", 9.2)  # 2.3× larger: structures 2.3× smaller
    _tiff(tmp_path / "in" / "close.tif", 4.6)  # within 25 %
    _tiff(tmp_path / "in" / "fine.tif", 2.0)
    _tiff(tmp_path / "in" / "plain.tif")  # unknown
    code, _, err = cli(capsys, "predict", path, tmp_path / "in", "--out", tmp_path / "out",
                       "--tile", "64", "--overlap", "16", "--device", "cpu")
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert code == 0 and len(warnings) == 2, err
    assert "coarse.tif: 9.2 nm pixels, where the model was trained on 4 nm ones (2.3× larger)" \
        in warnings[0] and "rescale it by 2.3 (predict --rescale" in warnings[0]
    assert "fine.tif: 2 nm pixels" in warnings[1] and "(0.5× smaller)" in warnings[1]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == \
        ["close.tif", "coarse.tif", "fine.tif", "plain.tif"]  # labelled all the same

    from cellseg_plugins.engine.predict import predict_paths

    with pytest.warns(UserWarning, match="coarse.tif: 9.2 nm pixels"):  # Python: a warning
        predict_paths(path, [str(tmp_path / "in" / "coarse.tif")], tmp_path / "py", tile=64)


def test_exported_models_carry_the_pixel_size(tmp_path):
    from cellseg_plugins.engine.export import export_checkpoint
    from cellseg_plugins.engine.predict import load_predictor

    path, _ = checkpoint(tmp_path, "classic_unet(width=4,depth=2)")
    ckpt = torch.load(path, weights_only=False)
    torch.save({**ckpt, "pixel_nm": 4.0}, path)
    onnx = export_checkpoint(path, "onnx", tmp_path / "model.onnx")
    assert load_predictor(onnx, "onnx")[1]["pixel_nm"] == 4.0
    assert load_predictor(path)[1]["pixel_nm"] == 4.0


def test_the_napari_widget_warns_about_a_layer_of_another_pixel_size(tmp_path):
    """The layer's scale in its units (napari >= 0.6) against the training images': 10 nm
    pixels for a 4 nm model warn, 4 nm ones and a scale in pixels (napari's default) do not."""
    import warnings
    from types import SimpleNamespace

    import pint

    from cellseg_plugins.napari_widget import segment

    path, _ = checkpoint(tmp_path, "classic_unet(width=4)")
    ckpt = torch.load(path, weights_only=False)
    torch.save({**ckpt, "pixel_nm": 4.0}, path)
    units = pint.get_application_registry()
    image = np.zeros((64, 64), np.uint8)
    for scale, unit, warned in [(0.010, units.micrometer, True), (4.0, units.nanometer, False),
                                (1.0, units.pixel, False)]:
        layer = SimpleNamespace(data=image, name="em", rgb=False, scale=(scale, scale),
                                translate=(0.0, 0.0), units=(unit, unit))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            segment(layer, model=path, tile=64)
        messages = [str(w.message) for w in caught if "nm pixels" in str(w.message)]
        assert messages == (["image layer 'em': 10 nm pixels, where the model was trained on "
                             "4 nm ones (2.5× larger): its labels may be poor; rescale it by 2.5 "
                             "(predict --rescale, or the napari widget's rescale, do so and "
                             "bring the labels back) or train on images of its pixel size"]
                            if warned else []), messages


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_rescale_plane_keeps_pixel_type_and_range(dtype):
    from cellseg_plugins.engine.predict import rescale_plane

    ramp = (np.linspace(0, 200, 40 * 30).reshape(40, 30)).astype(dtype)
    for factor, shape in [(2.3, (92, 69)), (0.5, (20, 15))]:
        out = rescale_plane(ramp, factor)
        assert out.dtype == dtype and out.shape == shape
        assert ramp.min() <= out.min() and out.max() <= ramp.max()  # no overshoot
        assert np.all(np.diff(out.astype(np.float64), axis=1) >= -1)  # still a ramp
    assert rescale_plane(np.full((40, 30), 7, dtype), 0.37).tolist() == \
        np.full((15, 11), 7, dtype).tolist()  # 40 × 0.37 = 14.8 → 15 rows
    rgb = np.zeros((40, 30, 3), dtype)
    rgb[..., 1] = 9
    out = rescale_plane(rgb, 0.5)
    assert out.shape == (20, 15, 3) and np.all(out[..., 1] == 9) and np.all(out[..., 0] == 0)


def test_predict_rescale_predicts_at_the_models_pixel_size_and_labels_back(tmp_path, capsys):
    """An 8 nm image for a 4 nm model: the image twice as large (structures at the size the
    model learnt), scaled to [0, 1] by the image as it is, its labels nearest-resized back
    to the image's size; a model without a pixel size is one line, nothing written."""
    from PIL import Image

    from cellseg_plugins.engine.predict import (load_predictor, predict_image, rescale_plane,
                                                unit_tiles)

    path, _ = checkpoint(tmp_path, "classic_unet(width=4)")
    code, _, err = cli(capsys, "predict", path, _tiff(tmp_path / "em.tif", 8.0), "--out",
                       tmp_path / "none", "--rescale", "--device", "cpu")
    assert code == 2 and "--rescale: " in err and "has no pixel size" in err
    assert not (tmp_path / "none").exists()

    ckpt = torch.load(path, weights_only=False)
    torch.save({**ckpt, "pixel_nm": 4.0}, path)
    (tmp_path / "in").mkdir()
    image = (np.random.default_rng(1).random((50, 70)) * 200).astype(np.uint8) + 20
    tifffile.imwrite(tmp_path / "in" / "coarse.tif", image, imagej=True,
                     resolution=(1 / 8.0, 1 / 8.0), metadata={"unit": "nm"})
    _tiff(tmp_path / "in" / "plain.tif")
    code, _, err = cli(capsys, "predict", path, tmp_path / "in", "--out", tmp_path / "out",
                       "--tile", "64", "--overlap", "16", "--device", "cpu", "--rescale")
    assert code == 0, err
    assert "coarse.tif: rescaled by 2 to the model's pixel size" in err
    assert "warning: " in err and "plain.tif: no pixel size" in err
    model, meta, rules = load_predictor(path)
    upscaled = rescale_plane(image, 2.0)
    assert upscaled.shape == (100, 140)
    labels = predict_image(model, upscaled, meta["norm"]["mean"], meta["norm"]["std"], 64, 16,
                           rules, "cpu", None, unit_tiles(image, 1, "coarse"))
    expected = np.asarray(Image.fromarray(labels).resize((70, 50), Image.NEAREST))
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / "coarse.tif"), expected)


def test_pixel_sizes_given_on_the_command_line(tmp_path, capsys):
    """`train --pixel-size` for training images whose files do not say it; `predict
    --pixel-size` for the inputs (over their files' calibration); a size <= 0 is one line."""
    from cellseg_plugins.engine.train import Trainer

    trainer = Trainer(tiny_config(tmp_path / "run", epochs=1, pixel_size=5.0))  # synthetic
    assert trainer.checkpoint()["pixel_nm"] == 5.0
    path, _ = checkpoint(tmp_path, "classic_unet(width=4)")
    torch.save({**torch.load(path, weights_only=False), "pixel_nm": 4.0}, path)
    image = _tiff(tmp_path / "plain.tif")  # no calibration: no check, unless given
    args = ["predict", path, image, "--tile", "64", "--device", "cpu"]
    code, _, err = cli(capsys, *args, "--out", tmp_path / "a")
    assert code == 0 and "warning" not in err, err
    code, _, err = cli(capsys, *args, "--out", tmp_path / "b", "--pixel-size", "10")
    assert code == 0 and "warning: " in err and "plain.tif: 10 nm pixels" in err, err
    for bad, command in [("0", args), ("-4", args), ("0", ["train", "unet"])]:
        code, _, err = cli(capsys, *command, "--out", tmp_path / "c", "--pixel-size", bad)
        assert code == 2 and err.count("\n") == 1 and "--pixel-size" in err and "> 0" in err
    assert not (tmp_path / "c").exists()


def test_the_napari_widget_and_predict_array_rescale(tmp_path):
    """``rescale`` in the widget: a 10 nm layer for a 4 nm model is predicted 2.5× larger and
    its labels come back at the layer's size (as ``predict_array(..., scale=2.5)``, which is
    :func:`predict_plane` plane by plane), without a warning; a layer in pixels warns."""
    import warnings
    from types import SimpleNamespace

    import pint

    import cellseg_plugins as cs
    from cellseg_plugins.engine.predict import (load_predictor, predict_array, predict_plane,
                                                rescale_plane)
    from cellseg_plugins.napari_widget import segment

    path, _ = checkpoint(tmp_path, "classic_unet(width=4)")
    torch.save({**torch.load(path, weights_only=False), "pixel_nm": 4.0}, path)
    units = pint.get_application_registry()
    image = (np.random.default_rng(2).random((2, 40, 52)) * 255).astype(np.uint8)
    predictor = load_predictor(path)
    model, meta, rules = predictor
    by_plane = np.stack([predict_plane(model, p, meta, 64, 16, rules, "cpu", None, "em", 2.5)
                         for p in image])
    assert rescale_plane(image[0], 2.5).shape == (100, 130)
    np.testing.assert_array_equal(predict_array(predictor, image, tile=64, overlap=16,
                                                scale=2.5), by_plane)
    with pytest.raises(cs.CellsegError, match="scale=0"):
        predict_array(predictor, image, scale=0)
    for unit, scale, expected in [(units.micrometer, 0.010, None),
                                  (units.pixel, 1.0, "image layer 'em' has no pixel size")]:
        layer = SimpleNamespace(data=image, name="em", rgb=False, scale=(1.0, scale, scale),
                                translate=(0.0,) * 3, units=(unit,) * 3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            labels, _, _ = segment(layer, model=path, tile=64, overlap=16, rescale=True)
        messages = [str(w.message) for w in caught if "pixel" in str(w.message)]
        assert labels.shape == image.shape
        if expected is None:
            assert messages == [], messages
            np.testing.assert_array_equal(labels, by_plane)
        else:
            assert len(messages) == 1 and expected in messages[0], messages
