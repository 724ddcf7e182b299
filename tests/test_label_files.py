"""Label TIFFs: ImageJ hyperstacks that Fiji opens with their axes, pixel size and Z spacing,
with cellseg's class names in their ImageJ properties."""

import json

import numpy as np
import pytest
import tifffile

from cellseg_plugins.engine.image_files import pixel_calibration
from cellseg_plugins.engine.label_files import (imagej_axes, label_layout, labels_info,
                                                write_labels)
from cellseg_plugins.engine.predict import predict_paths
from conftest import checkpoint

META = {"class_names": ["background", "membrane", "mitochondria"], "spec": "classic_unet"}


@pytest.mark.parametrize("letters, expected", [
    ("", ""), ("I", "Z"), ("Q", "Z"), ("Z", "Z"), ("T", "T"), ("C", "C"),  # one axis
    ("ZC", "ZC"), ("TZ", "TZ"), ("TC", "TC"), ("TZC", "TZC"),  # in ImageJ's order: kept
    ("CZ", "ZC"), ("QQ", "ZC"), ("ZT", "ZC"), ("ZZ", "ZC"), ("CZT", "TZC"),  # by their number
    ("TZCQ", None)])  # ImageJ holds three at most
def test_imagej_axes_keep_tzc_in_order_and_else_go_by_number(letters, expected):
    assert imagej_axes(letters) == expected


def test_a_hyperstack_labels_file_is_an_imagej_hyperstack_with_its_calibration(tmp_path):
    """Z × C planes of 4 nm pixels and 50 nm sections: the labels are ZCYX in ImageJ's format,
    in µm as Fiji writes them, their classes in view (display range 0–2) and cellseg's
    properties in its "Properties"; size-1 axes are dropped, as ImageJ drops them."""
    pages = [np.full((6, 7), k % 3, np.uint8) for k in range(10)]
    calibration = {"resolution": (2.5e6, 2.5e6), "resolutionunit": 3, "spacing": 5e-6}
    write_labels(tmp_path / "zc.tif", iter(pages), (5, 2, 6, 7), META, calibration, "ZC")
    with tifffile.TiffFile(tmp_path / "zc.tif") as f:
        ij, (x, y) = f.imagej_metadata, f.pages.first.get_resolution()
        assert f.series[0].axes == "ZCYX" and f.series[0].shape == (5, 2, 6, 7)
        np.testing.assert_array_equal(f.asarray(), np.stack(pages).reshape(5, 2, 6, 7))
    assert (ij["slices"], ij["channels"], ij["unit"]) == (5, 2, "micron")
    assert ij["spacing"] == pytest.approx(0.05) and (x, y) == pytest.approx((250, 250))
    assert (ij["min"], ij["max"]) == (0, 2)
    assert json.loads(ij["Properties"]["cellseg"]) == META == labels_info(tmp_path / "zc.tif")
    back = pixel_calibration(tmp_path / "zc.tif")  # read back as written
    assert back["resolution"] == pytest.approx((2.5e6, 2.5e6)) and back["resolutionunit"] == 3
    assert back["spacing"] == pytest.approx(5e-6)

    write_labels(tmp_path / "one.tif", iter(pages[:2]), (1, 2, 6, 7), META, None, "ZC")
    with tifffile.TiffFile(tmp_path / "one.tif") as f:
        assert f.series[0].axes == "CYX" and f.series[0].shape == (2, 6, 7)
    write_labels(tmp_path / "plane.tif", iter(pages[:1]), (6, 7), META)
    assert tifffile.imread(tmp_path / "plane.tif").shape == (6, 7)
    assert labels_info(tmp_path / "plane.tif") == META


def test_labels_with_more_axes_than_imagej_holds_keep_them_in_tifffiles_format(tmp_path):
    shape = (2, 2, 2, 2, 6, 7)
    pages = [np.full((6, 7), k % 3, np.uint8) for k in range(16)]
    calibration = {"resolution": (2.5e6, 2.5e6), "resolutionunit": 3, "spacing": 5e-6}
    write_labels(tmp_path / "many.tif", iter(pages), shape, META, calibration)
    assert tifffile.imread(tmp_path / "many.tif").shape == shape
    assert labels_info(tmp_path / "many.tif") == META
    assert pixel_calibration(tmp_path / "many.tif") == {"resolution": (2.5e6, 2.5e6),
                                                        "resolutionunit": 3}


def test_label_files_of_earlier_versions_are_still_read(tmp_path):
    """Labels written before the ImageJ format (tifffile's shaped JSON description) keep their
    class names for the napari reader and ``predict --resume``; other TIFFs, ImageJ ones with
    foreign properties included, have none."""
    tifffile.imwrite(tmp_path / "old.tif", np.zeros((2, 6, 7), np.uint8),
                     metadata={"cellseg": META}, photometric="minisblack")
    assert labels_info(tmp_path / "old.tif") == META
    tifffile.imwrite(tmp_path / "fiji.tif", np.zeros((2, 6, 7), np.uint8), imagej=True,
                     metadata={"Properties": {"cellseg": "{not json"}, "axes": "ZYX"})
    assert labels_info(tmp_path / "fiji.tif") is None
    tifffile.imwrite(tmp_path / "plain.tif", np.zeros((6, 7), np.uint8))
    assert labels_info(tmp_path / "plain.tif") is None


def test_predict_writes_each_input_layout_as_imagej_axes(tmp_path):
    """What Fiji shows of each input's labels: a plain TIFF stack's pages as slices (Z), an
    ImageJ time series as frames (T), a Z × C hyperstack as slices × channels, one image as
    one plane; each with the input's calibration (an ImageJ stack's nm and spacing in µm)."""
    ckpt, _ = checkpoint(tmp_path, "classic_unet(width=4)")
    (tmp_path / "in").mkdir()
    image = np.zeros((40, 50), np.uint8)
    tifffile.imwrite(tmp_path / "in" / "pages.tif", np.stack([image] * 3),
                     photometric="minisblack")
    tifffile.imwrite(tmp_path / "in" / "movie.tif", np.stack([image] * 3), imagej=True,
                     metadata={"axes": "TYX"})
    tifffile.imwrite(tmp_path / "in" / "hyper.tif", np.zeros((4, 2, 40, 50), np.uint8),
                     imagej=True, resolution=(0.25, 0.25),
                     metadata={"axes": "ZCYX", "unit": "nm", "spacing": 30.0})
    tifffile.imwrite(tmp_path / "in" / "one.tif", image)
    expected = {"pages": ("ZYX", (3, 40, 50)), "movie": ("TYX", (3, 40, 50)),
                "hyper": ("ZCYX", (4, 2, 40, 50)), "one": ("YX", (40, 50))}
    for path in sorted((tmp_path / "in").iterdir()):
        axes, shape = label_layout(path, tifffile.imread(path).shape if path.stem != "hyper"
                                   else (8, 40, 50))
        assert (axes + "YX", shape) == expected[path.stem]
    written = predict_paths(ckpt, [str(tmp_path / "in")], tmp_path / "out", tile=32, overlap=8)
    for path in written:
        with tifffile.TiffFile(path) as f:
            assert (f.series[0].axes, f.series[0].shape) == expected[path.stem]
            assert json.loads(f.imagej_metadata["Properties"]["cellseg"])["spec"] == \
                "classic_unet(width=4)"
    with tifffile.TiffFile(tmp_path / "out" / "hyper.tif") as f:  # 4 nm, 30 nm in µm
        assert f.imagej_metadata["spacing"] == pytest.approx(0.03)
        assert f.pages.first.get_resolution() == pytest.approx((250, 250))
