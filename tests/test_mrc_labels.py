"""MRC label files (``predict --format mrc``): the same classes as the label TIFFs, on the
MRC image's voxel size, origin and sections, with the class names in their text labels."""

import json

import mrcfile
import numpy as np
import pytest
import tifffile

from cellseg_plugins.engine.image_files import pixel_calibration
from cellseg_plugins.engine.label_files import _chunks, _mrc_labels, labels_info
from cellseg_plugins.engine.predict import predict_paths
from cellseg_plugins.napari_widget import get_reader, write_labels_layer
from conftest import checkpoint, cli

SPEC = "classic_unet(width=4)"


def _inputs(folder):
    """An MRC stack of volumes placed in space, an IMOD image stack, a calibrated ImageJ
    Z × C hyperstack and one PNG."""
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    with mrcfile.new(folder / "tomos.mrcs") as mrc:
        mrc.set_data(rng.integers(0, 255, (2, 3, 40, 50)).astype(np.int16))
        mrc.voxel_size = (12.5, 12.5, 20.0)
        mrc.header.origin = (100.0, 200.0, 300.0)
        mrc.nstart = (5, 6, 7)
    with mrcfile.new(folder / "em.st") as mrc:
        mrc.set_data(rng.integers(0, 255, (3, 40, 50)).astype(np.int16))
        mrc.set_image_stack()
        mrc.voxel_size = 40.0
    tifffile.imwrite(folder / "hyper.tif", rng.integers(0, 255, (4, 2, 40, 50), np.uint8),
                     imagej=True, resolution=(0.25, 0.25),
                     metadata={"axes": "ZCYX", "unit": "nm", "spacing": 30.0})
    Image.fromarray(rng.integers(0, 255, (40, 50), np.uint8)).save(folder / "one.png")


def test_mrc_labels_hold_the_tiffs_classes_on_the_images_geometry(tmp_path):
    ckpt, _ = checkpoint(tmp_path, SPEC)
    _inputs(tmp_path / "in")
    written = predict_paths(ckpt, [str(tmp_path / "in")], tmp_path / "mrc", tile=32, overlap=8,
                            label_format="mrc")
    tiffs = predict_paths(ckpt, [str(tmp_path / "in")], tmp_path / "tif", tile=32, overlap=8)
    assert [p.name for p in written] == ["em.mrc", "hyper.mrc", "one.mrc", "tomos.mrc"]
    expected = {  # shape, voxel size (Å), origin, start, space group
        "tomos": ((2, 3, 40, 50), (12.5, 12.5, 20.0), (100.0, 200.0, 300.0), (5, 6, 7), 401),
        "em": ((3, 40, 50), (40.0, 40.0, 40.0), (0.0, 0.0, 0.0), (0, 0, 0), 0),  # a stack
        "hyper": ((8, 40, 50), (40.0, 40.0, 300.0), (0.0, 0.0, 0.0), (0, 0, 0), 1),  # 4 nm, 30
        "one": ((40, 50), (0.0, 0.0, 0.0), (0.0, 0.0, 0.0), (0, 0, 0), 0)}  # no size
    for path, tif in zip(written, tiffs):
        shape, voxel, origin, start, ispg = expected[path.stem]
        assert mrcfile.validate(str(path), print_file=open("/dev/null", "w"))
        with mrcfile.open(path) as mrc:
            data = np.array(mrc.data)
            assert data.shape == shape
            assert tuple(mrc.voxel_size.item()) == pytest.approx(voxel)
            assert tuple(mrc.header.origin.item()) == pytest.approx(origin)
            assert tuple(mrc.nstart.item()) == start and int(mrc.header.ispg) == ispg
            assert (mrc.header.dmin, mrc.header.dmax) == (data.min(), data.max())
            assert mrc.header.dmean == pytest.approx(data.mean())
            assert mrc.header.mode == 0 and data.dtype == np.int8
            assert mrc.get_labels()[0].startswith("cellseg labels: 0 c0, 1 c1, 2 c2")
        # the same classes in the same order as the TIFF's (the MRC's stored order)
        np.testing.assert_array_equal(data.reshape(-1, 40, 50),
                                      tifffile.imread(tif).reshape(-1, 40, 50))
        info = labels_info(path)
        assert info["class_names"] == ["c0", "c1", "c2"] and info["spec"] == SPEC
        assert info == labels_info(tif)  # made_by too: what --resume compares


def test_resume_keeps_mrc_labels_and_napari_reads_them(tmp_path):
    ckpt, _ = checkpoint(tmp_path, SPEC)
    _inputs(tmp_path / "in")
    out = tmp_path / "out"
    predict_paths(ckpt, [str(tmp_path / "in")], out, tile=32, overlap=8, label_format="mrc")
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    kept = []
    predict_paths(ckpt, [str(tmp_path / "in")], out, tile=32, overlap=8, label_format="mrc",
                  resume=True, on_kept=lambda path, target: kept.append(target.name))
    assert sorted(kept) == sorted(stamps)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    predict_paths(ckpt, [str(tmp_path / "in")], out, tile=32, overlap=4, label_format="mrc",
                  resume=True, on_kept=lambda path, target: kept.append(target.name))
    assert len(kept) == len(stamps)  # another tiling: nothing kept

    ((data, kwargs, kind),) = get_reader(str(out / "tomos.mrc"))(str(out / "tomos.mrc"))
    with mrcfile.open(out / "tomos.mrc") as mrc:
        np.testing.assert_array_equal(data, mrc.data)
    assert kind == "labels" and data.shape == (2, 3, 40, 50)
    assert kwargs["features"]["class"] == ["c0", "c1", "c2"]
    assert kwargs["metadata"]["axes"] == "TZ"
    assert get_reader(str(tmp_path / "in" / "tomos.mrcs")) is None  # not labels: others' turn


def test_proofread_mrc_labels_save_from_napari_on_their_geometry(tmp_path):
    """A labels layer opened from an MRC label file, painted and saved over it by cellseg's
    writer, keeps its classes, what made it and its header geometry; a layer opened from a
    label TIFF saved as .mrc gets the TIFF's pixel size as its voxel size."""
    ckpt, _ = checkpoint(tmp_path, SPEC)
    _inputs(tmp_path / "in")
    inputs = [str(tmp_path / "in" / name) for name in ("tomos.mrcs", "hyper.tif")]
    mrc_file, _ = predict_paths(ckpt, inputs, tmp_path / "mrc", tile=32, overlap=8,
                                  label_format="mrc")
    _, tif_file = predict_paths(ckpt, inputs, tmp_path / "tif", tile=32, overlap=8)
    made_by = labels_info(mrc_file)["made_by"]
    ((data, kwargs, _),) = get_reader(str(mrc_file))(str(mrc_file))
    data = data.astype(np.int32)
    data[1, 2, :8, :8] = 2  # a brush stroke of class c2
    assert write_labels_layer(str(mrc_file), data, {**kwargs, "multiscale": False}) == \
        [str(mrc_file)]
    with mrcfile.open(mrc_file) as mrc:
        np.testing.assert_array_equal(mrc.data, data)
        assert tuple(mrc.header.origin.item()) == (100.0, 200.0, 300.0)
        assert tuple(mrc.voxel_size.item()) == (12.5, 12.5, 20.0) and mrc.header.ispg == 401
    assert labels_info(mrc_file)["made_by"] == made_by  # --resume keeps the proofread file

    ((data, kwargs, _),) = get_reader(str(tif_file))(str(tif_file))
    write_labels_layer(str(tmp_path / "hyper.mrc"), data, {**kwargs, "multiscale": False})
    saved, labelled = pixel_calibration(tmp_path / "hyper.mrc"), pixel_calibration(tif_file)
    assert saved["resolution"] == pytest.approx(labelled["resolution"])  # 4 nm pixels
    assert saved["spacing"] == pytest.approx(labelled["spacing"])  # 30 nm sections
    with mrcfile.open(tmp_path / "hyper.mrc") as mrc:
        np.testing.assert_array_equal(mrc.data, data.reshape(8, 40, 50))


def test_mrc_text_labels_hold_the_properties_as_far_as_they_fit():
    """80-character labels, none ending in a space (padding is stripped on reading); the spec
    is left out where the whole does not fit in nine, every property where the class names
    alone do not."""
    assert _chunks("ab cd", 3) == ["ab", " cd"] and _chunks("abc", 2) == ["ab", "c"]
    info = {"class_names": ["a b"] * 30, "spec": "classic_unet"}
    labels = _mrc_labels(info)
    assert labels[0].startswith("cellseg labels: 0 a b, 1 a b") and len(labels[0]) == 80
    assert all(len(text) <= 80 and not text.endswith(" ") for text in labels)
    assert json.loads("".join(labels[1:])) == info
    long_spec = {"class_names": ["c0", "c1"], "spec": "unet+" * 200}
    assert json.loads("".join(_mrc_labels(long_spec)[1:])) == {"class_names": ["c0", "c1"]}
    assert _mrc_labels({"class_names": [f"class {k}" for k in range(100)], "spec": "x"}
                       )[1:] == []
    assert _mrc_labels({"class_names": ["µm"], "spec": "x"})[0].isascii()


def test_a_bad_label_format_is_one_line_and_writes_nothing(tmp_path, capsys):
    ckpt, _ = checkpoint(tmp_path, SPEC)
    _inputs(tmp_path / "in")
    code, _, err = cli(capsys, "predict", ckpt, tmp_path / "in", "--out", tmp_path / "out",
                       "--format", "png")
    assert code != 0 and "--format 'png': expected tif or mrc" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    code, out, err = cli(capsys, "predict", ckpt, tmp_path / "in" / "em.st", "--out",
                         tmp_path / "out", "--format", "mrc")
    assert code == 0 and (tmp_path / "out" / "em.mrc").is_file(), err


def test_label_files_as_training_masks_keep_their_class_names(tmp_path, capsys):
    """Labels written by ``cellseg predict`` (TIFF or MRC), proofread or not, train a model
    whose classes keep their names; a value that is no class of its file is one line; masks
    that are not all cellseg's go by their values."""
    from cellseg_plugins.engine.data import DataError, load_folder
    from cellseg_plugins.engine.label_files import write_labels

    ckpt, _ = checkpoint(tmp_path, SPEC)
    _inputs(tmp_path / "in")
    root = tmp_path / "proofread"
    (root / "images").mkdir(parents=True)
    for name in ("em.st", "hyper.tif"):
        (root / "images" / name).write_bytes((tmp_path / "in" / name).read_bytes())
    predict_paths(ckpt, [str(root / "images" / "em.st")], root / "masks", tile=32, overlap=8,
                  label_format="mrc")
    predict_paths(ckpt, [str(root / "images" / "hyper.tif")], root / "masks", tile=32,
                  overlap=8)
    sources = load_folder(root)
    assert sources.class_names == ("c0", "c1", "c2") and len(sources.masks) == 3 + 8
    code, out, err = cli(capsys, "data", "info", root)
    assert code == 0 and "c0" in out and "class0" not in out, err

    painted = tifffile.imread(root / "masks" / "hyper.tif").reshape(8, 40, 50)
    painted[2, 0, 0] = 5  # a value no class of the file has
    write_labels(root / "masks" / "hyper.tif", iter(painted), (4, 2, 40, 50),
                 {"class_names": ["c0", "c1", "c2"], "spec": SPEC})
    with pytest.raises(DataError, match=r"hyper.tif: mask value 5 is no class of this label "
                                        r"file's \(c0, c1, c2: 0–2\)"):
        load_folder(root)
    painted[2, 0, 0] = 1
    tifffile.imwrite(root / "masks" / "hyper.tif", painted)  # a plain TIFF: no class names
    assert load_folder(root).class_names == ("class0", "class1", "class2")
