"""The napari plugin: a manifest npe2 accepts; a widget that labels a layer as ``cellseg
predict`` labels the same image (planes of stacks, scale, class names, progress, bad input);
a reader for prediction TIFFs, a writer that keeps their class names; and the widget docked
in a real viewer (under Xvfb)."""

import importlib
import os
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before Qt loads: no window needed

import numpy as np
import pytest
import tifffile
import torch
from npe2 import PluginManifest

import cellseg_plugins as cs
from cellseg_plugins.engine.image_files import pixel_calibration
from cellseg_plugins.errors import DataError
from cellseg_plugins.engine.export import export_checkpoint
from cellseg_plugins.engine.predict import labels_info, predict_paths
from cellseg_plugins.napari_widget import (get_reader, segment, segment_in_background,
                                           write_labels_layer)
from conftest import checkpoint

MANIFEST = Path(cs.__file__).parent / "napari.yaml"


def layer(data, rgb=False, name="em"):
    ndim = data.ndim - (1 if rgb else 0)
    return SimpleNamespace(data=data, name=name, rgb=rgb, scale=(2.0,) * ndim,
                           translate=(5.0,) * ndim)


def test_the_manifest_is_valid_and_names_the_widget_the_reader_and_the_writer():
    manifest = PluginManifest.from_file(MANIFEST)
    assert manifest.name == "cellseg"  # npe2 requires the distribution's name
    commands = {c.id: c.python_name for c in manifest.contributions.commands}
    (widget,) = manifest.contributions.widgets
    (reader,) = manifest.contributions.readers
    (writer,) = manifest.contributions.writers
    assert widget.autogenerate
    assert [(c.layer_type, c.bounds) for c in writer.layer_type_constraints()
            if not c.is_zero()] == [("labels", (1, 2))]  # exactly one labels layer
    assert writer.filename_extensions == [".tif", ".tiff", ".mrc"]
    for command_id, function in [(widget.command, segment_in_background),
                                 (reader.command, get_reader),
                                 (writer.command, write_labels_layer)]:
        module, attr = commands[command_id].split(":")
        assert getattr(importlib.import_module(module), attr) is function
    installed = PluginManifest.from_distribution("cellseg")  # the napari.manifest entry point
    assert {c.id for c in installed.contributions.commands} == set(commands)


def test_segment_labels_a_layer_as_cellseg_predict_labels_the_file(tmp_path):
    path, _ = checkpoint(tmp_path, "classic_unet(width=4)+lfa(m=3)")
    image = np.random.default_rng(0).integers(0, 256, (70, 90), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "em.tif", image)
    (written,) = predict_paths(path, [str(tmp_path / "em.tif")], tmp_path / "pred", tile=64)
    labels, kwargs, kind = segment(layer(image), model=path, tile=64)
    assert kind == "labels" and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, tifffile.imread(written))
    assert kwargs["name"] == "em cellseg" and kwargs["scale"] == (2.0, 2.0)
    assert kwargs["translate"] == (5.0, 5.0)
    assert kwargs["features"] == {"class": ["c0", "c1", "c2"]}  # row k names label k

    stack = np.stack([image, image[::-1]])  # a (planes, H, W) layer: each plane on its own
    planes, kwargs, _ = segment(layer(stack), model=path, tile=64)
    assert planes.shape == (2, 70, 90) and kwargs["scale"] == (2.0,) * 3
    np.testing.assert_array_equal(planes[0], labels)
    np.testing.assert_array_equal(planes[1], segment(layer(image[::-1]), model=path, tile=64)[0])
    (augmented,) = predict_paths(path, [str(tmp_path / "em.tif")], tmp_path / "tta", tile=64,
                                 tta="flips")  # the widget's test-time augmentation is predict's
    flipped, _, _ = segment(layer(image), model=path, tile=64, tta="flips")
    np.testing.assert_array_equal(flipped, tifffile.imread(augmented))
    assert (flipped != labels).any()


def test_a_dask_layer_is_labelled_as_its_array(tmp_path):
    """napari opens large stacks lazily (dask): they are segmented a plane at a time."""
    da = pytest.importorskip("dask.array")
    path, _ = checkpoint(tmp_path, "classic_unet(width=4)")
    stack = np.random.default_rng(5).integers(0, 256, (3, 64, 96), dtype=np.uint8)
    labels, _, _ = segment(layer(da.from_array(stack, chunks=(1, 64, 96))), model=path, tile=64)
    np.testing.assert_array_equal(labels, segment(layer(stack), model=path, tile=64)[0])


def test_predict_array_reports_every_tile_of_every_plane(tmp_path):
    from cellseg_plugins.engine.predict import load_predictor, predict_array

    path, _ = checkpoint(tmp_path, "classic_unet(width=4)")
    calls = []
    labels = predict_array(load_predictor(path), np.zeros((3, 100, 64), np.uint8), tile=64,
                           overlap=16, progress=lambda done, total: calls.append((done, total)))
    # rows start at 0, 36 (=100-64) → 2 tiles a plane, 3 planes
    assert labels.shape == (3, 100, 64) and calls == [(k, 6) for k in range(1, 7)]


@pytest.mark.parametrize("fmt", ["onnx", "bioimageio"])
def test_an_exported_model_labels_the_layer_like_its_checkpoint(tmp_path, fmt):
    path, _ = checkpoint(tmp_path, "classic_unet(width=4)")
    exported = export_checkpoint(path, fmt, check=False)  # the Zoo's test: tests/test_export.py
    image = np.random.default_rng(1).random((64, 96)).astype(np.float32)
    torch_labels, torch_kwargs, _ = segment(layer(image), model=path)
    labels, kwargs, _ = segment(layer(image), model=exported, runtime="torch")  # ONNX wins
    assert (labels == torch_labels).mean() > 0.999
    assert kwargs["features"] == torch_kwargs["features"] == {"class": ["c0", "c1", "c2"]}


def test_a_multiscale_layer_is_segmented_at_full_resolution_and_onnx_on_the_cpu(tmp_path):
    """A pyramid's data is a list of levels: its first, full-resolution level is segmented
    (np.asarray of napari's MultiScaleData gives the coarsest level: labels of half the
    image's size were laid over it on the image's scale). ONNX Runtime runs on the CPU, so
    device 'cuda' (or 'auto' on a GPU machine) does not send its tiles to the GPU."""
    napari = pytest.importorskip("napari")
    path, _ = checkpoint(tmp_path, "classic_unet(width=4)")
    image = np.random.default_rng(2).integers(0, 256, (96, 128), dtype=np.uint8)
    pyramid = napari.layers.Image([image, image[::2, ::2]], multiscale=True, name="em")
    labels, kwargs, _ = segment(pyramid, model=path, tile=64)
    np.testing.assert_array_equal(labels, segment(layer(image), model=path, tile=64)[0])
    assert kwargs["scale"] == (1.0, 1.0)
    exported = export_checkpoint(path, "onnx", check=False)
    onnx_labels, _, _ = segment(layer(image), model=exported, tile=64, device="cuda")
    assert (onnx_labels == labels).mean() > 0.999


def test_the_reader_opens_predictions_only(tmp_path):
    path, _ = checkpoint(tmp_path, "classic_unet(width=4)")
    tifffile.imwrite(tmp_path / "em.tif", np.zeros((2, 64, 64), np.uint8))
    (written,) = predict_paths(path, [str(tmp_path / "em.tif")], tmp_path / "pred", tile=64)
    assert get_reader(str(tmp_path / "em.tif")) is None  # a plain image: other readers' turn
    assert get_reader(str(tmp_path / "missing.tif")) is None
    ((data, kwargs, kind),) = get_reader(str(written))(str(written))
    np.testing.assert_array_equal(data, tifffile.imread(written))
    assert kind == "labels" and data.shape == (2, 64, 64)
    assert kwargs["features"] == {"class": ["c0", "c1", "c2"]}
    assert kwargs["metadata"]["spec"] == "classic_unet(width=4)"


def test_the_writer_saves_a_proofread_layer_that_opens_again_with_its_classes(tmp_path):
    path, _ = checkpoint(tmp_path, "classic_unet(width=4)")
    tifffile.imwrite(tmp_path / "em.tif", np.zeros((2, 64, 64), np.uint8),
                     resolution=(2.5e6, 2.5e6), resolutionunit="CENTIMETER")  # 4 nm pixels
    (written,) = predict_paths(path, [str(tmp_path / "em.tif")], tmp_path / "pred", tile=64)
    made_by = labels_info(written)["made_by"]  # what predict --resume compares
    ((data, kwargs, _),) = get_reader(str(written))(str(written))
    data = data.astype(np.int32)  # napari may hand back a wider type; values 0..2 all the same
    data[1, :8, :8] = 2  # a brush stroke of class c2
    attributes = {**kwargs, "multiscale": False}
    assert write_labels_layer(str(written), data, attributes) == [str(written)]  # over itself
    ((again, again_kwargs, kind),) = get_reader(str(written))(str(written))
    assert kind == "labels" and again.dtype == np.uint8 and again.shape == (2, 64, 64)
    np.testing.assert_array_equal(again, data)
    assert again_kwargs["features"] == {"class": ["c0", "c1", "c2"]}
    assert again_kwargs["metadata"]["spec"] == "classic_unet(width=4)"
    assert labels_info(written)["made_by"] == made_by  # --resume keeps the proofread file
    assert pixel_calibration(written) == {"resolution": (2.5e6, 2.5e6), "resolutionunit": 3}
    import pint  # napari >= 0.6 layers carry units: a scale in µm gives the pixel size

    um, px = pint.get_application_registry().micrometer, pint.get_application_registry().pixel
    scaled = {**attributes, "scale": (1.0, 0.008, 0.004), "units": (px, um, um)}
    write_labels_layer(str(tmp_path / "scaled.tif"), data, scaled)
    (x, y) = pixel_calibration(tmp_path / "scaled.tif")["resolution"]  # x: 4 nm, y: 8 nm
    assert (x, y) == pytest.approx((2.5e6, 1.25e6))
    write_labels_layer(str(tmp_path / "pixels.tif"), data, {**scaled, "units": (px, px, px)})
    assert pixel_calibration(tmp_path / "pixels.tif")["resolution"] == (2.5e6, 2.5e6)  # kept
    sections = {**attributes, "scale": (0.05, 0.004, 0.004), "units": (um, um, um)}
    write_labels_layer(str(tmp_path / "sections.tif"), data, sections)  # 50 nm sections
    assert pixel_calibration(tmp_path / "sections.tif")["spacing"] == pytest.approx(5e-6)
    assert "spacing" not in pixel_calibration(tmp_path / "scaled.tif")  # Z in pixels
    assert kwargs["metadata"]["axes"] == "Z"  # a stack's pages are ImageJ's slices
    volumes = np.stack([data, data])  # (V, Z, H, W): an MRC stack of volumes' labels
    for axes, expected in [("TZ", "TZYX"), (None, "ZCYX")]:  # the file's axes, else by number
        meta = {**attributes["metadata"], **({"axes": axes} if axes else {})}
        write_labels_layer(str(tmp_path / "volumes.tif"), volumes, {**attributes, "metadata": meta})
        with tifffile.TiffFile(tmp_path / "volumes.tif") as f:
            assert f.series[0].axes == expected
    assert write_labels_layer(str(tmp_path / "plane"), data[0], attributes) == \
        [str(tmp_path / "plane.tif")]  # no extension: .tif, as napari's own writer
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "plane.tif"), data[0])

    # a labels layer not of cellseg's: napari's own writer, as without cellseg (its pixels)
    other = {**attributes, "metadata": {}, "name": "hand-painted"}
    assert write_labels_layer(str(tmp_path / "other.tif"), data, other) == \
        [str(tmp_path / "other.tif")]
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "other.tif"), data)
    assert get_reader(str(tmp_path / "other.tif")) is None

    before = written.read_bytes()
    with pytest.raises(cs.CellsegError, match="labels layer 'em' is multiscale"):
        write_labels_layer(str(written), data, {**attributes, "multiscale": True})
    for value in (3, -1, 300):  # a label no class has: not written as another class
        painted = data.copy()
        painted[0, 5, 5] = value
        with pytest.raises(cs.CellsegError, match=rf"holds label {value}: its classes are "
                                                  r"0–2 \(c0, c1, c2\)"):
            write_labels_layer(str(written), painted, attributes)
    assert written.read_bytes() == before  # nothing written by a refused save


def test_bad_input_is_one_line_naming_the_value(tmp_path):
    path, _ = checkpoint(tmp_path, "classic_unet(width=4)")
    grey = np.zeros((64, 64), np.uint8)
    not_a_package = tmp_path / "photos.zip"
    not_a_package.write_bytes(b"PK")
    cases = [
        (dict(image=layer(grey), model=tmp_path / "none.pt"), "none.pt"),
        (dict(image=layer(grey), model=Path()), "choose a cellseg checkpoint"),
        (dict(image=layer(np.dstack([grey, grey, grey + 1]), rgb=True), model=path),
         "3 channel(s), the model expects 1 (a colour image, not grey saved as RGB)"),
        (dict(image=layer(grey), model=path, tile=16), "tile=16: must be at least 32"),
        (dict(image=layer(grey), model=path, tile=64, overlap=40),
         "overlap=40: must be in [0, 32] (at most half of the tile, 64)"),
        (dict(image=None, model=path), "no image layer"),
        (dict(image=layer(grey), model=not_a_package), "not a BioImage Model Zoo package"),
        (dict(image=layer(grey), model=path, device="tpu"), "device='tpu': expected auto, "
         "cpu or cuda"),
    ]
    if not torch.cuda.is_available():  # torch's RuntimeError about NVIDIA drivers before
        cases.append((dict(image=layer(grey), model=path, device="cuda"),
                      "device='cuda': no CUDA device is available (use cpu or auto)"))
    for kwargs, text in cases:
        with pytest.raises(cs.CellsegError) as err:
            segment(**kwargs)
        assert text in str(err.value) and "\n" not in str(err.value)


def test_magicgui_builds_the_widget_from_the_signature(qtbot, tmp_path):
    napari = pytest.importorskip("napari")
    from magicgui import magicgui

    path, _ = checkpoint(tmp_path, "classic_unet(width=4)")
    widget = magicgui(segment)
    assert widget.runtime.choices == ("torch", "onnx") and widget.tile.value == 256
    assert widget.device.choices == ("cpu", "cuda", "auto") and widget.device.value == "cpu"
    image = napari.layers.Image(np.zeros((64, 64), np.uint8), name="em")
    labels, kwargs, _ = widget(image=image, model=path, tile=64)
    assert labels.shape == (64, 64) and kwargs["name"] == "em cellseg"


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DISPLAY"), reason="a napari canvas needs OpenGL: "
                    "install Xvfb (pytest-xvfb starts it)")
def test_the_widget_docked_in_a_viewer_adds_a_labels_layer(make_napari_viewer, qtbot, tmp_path):
    """The widget segments in a thread: its call returns before the labels exist (the viewer
    is not frozen), the progress bar counts every tile, the layer comes when it is done; asked
    to stop, it adds nothing; a bad model is our one-line error, raised again in the main
    thread (napari's notifications)."""
    from napari.utils import progress

    path, _ = checkpoint(tmp_path, "classic_unet(width=4)")
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).random((2, 64, 80)).astype(np.float32), name="em",
                     scale=(0.05, 0.004, 0.004), units="micrometer")
    _, widget = viewer.window.add_plugin_dock_widget("cellseg", "Segment (cellseg)")
    widget.model.value, widget.tile.value = path, 64
    worker = widget()
    (bar,) = [p for p in progress._all_instances if p.desc == "cellseg: segmenting tiles"]
    assert "em cellseg" not in viewer.layers  # the call came back first
    with qtbot.waitSignal(worker.finished, timeout=60_000):
        pass
    qtbot.waitUntil(lambda: "em cellseg" in viewer.layers)
    labels = viewer.layers["em cellseg"]
    assert type(labels).__name__ == "Labels" and labels.data.shape == (2, 64, 80)
    assert list(labels.features["class"]) == ["c0", "c1", "c2"]
    assert [str(u) for u in labels.units] == ["micrometer"] * 3  # the image's, with its scale
    assert labels.save(str(tmp_path / "em_labels.tif"), plugin="cellseg")
    em = pixel_calibration(tmp_path / "em_labels.tif")
    assert em["resolution"] == pytest.approx((2.5e6, 2.5e6))  # 4 nm pixels, in pixels per cm
    assert em["spacing"] == pytest.approx(5e-6)  # 50 nm sections
    assert (bar.n, bar.total) == (4, 4)  # 2 planes x 2 tiles (80 wide, tiles of 64)
    assert bar not in progress._all_instances  # closed

    stopped = widget()
    (bar,) = [p for p in progress._all_instances if p.desc == "cellseg: segmenting tiles"]
    with pytest.raises(cs.CellsegError, match="layer 'em' is being segmented already"):
        widget()  # Run pressed again before the labels came: no second worker, bar or layer
    assert len([p for p in progress._all_instances if p.desc == bar.desc]) == 1
    stopped.quit()  # napari's cancel: it stops after the first tile, adding nothing
    with qtbot.waitSignal(stopped.finished, timeout=60_000):
        pass
    assert [layer.name for layer in viewer.layers] == ["em", "em cellseg"]
    assert bar.n == 0  # not one tile counted: it stopped at the first

    widget.model.value = tmp_path / "none.pt"
    with qtbot.capture_exceptions() as raised:  # in napari: its hook makes them notifications
        with qtbot.waitSignal(widget().finished, timeout=60_000):
            pass
    ((kind, error, _),) = raised
    assert issubclass(kind, cs.CellsegError) and "none.pt" in str(error)

    tifffile.imwrite(tmp_path / "section.tif", np.zeros((5, 128, 128), np.uint8))
    (written,) = predict_paths(path, [str(tmp_path / "section.tif")], tmp_path / "pred", tile=64)
    (opened,) = viewer.open(written, plugin="cellseg")
    assert type(opened).__name__ == "Labels" and opened.name == "section"
    # proofreading: a brush stroke, then the layer saved over the file it came from by our
    # writer (the save dialog's "cellseg labels with class names"), which keeps them
    label = int(opened.data[0, 10, 10]) ^ 1
    opened.paint((0, 10, 10), label)
    expected = np.array(opened.data)
    assert opened.save(str(written), plugin="cellseg") == [str(written)]
    (reopened,) = viewer.open(written, plugin="cellseg")
    assert type(reopened).__name__ == "Labels"
    np.testing.assert_array_equal(reopened.data, expected)
    assert list(reopened.features["class"]) == ["c0", "c1", "c2"]
    viewer.add_labels(np.ones((16, 16), np.uint8), name="hand-painted")  # not cellseg's:
    for plugin in ("cellseg", None):  # ours hands it to napari's own writer, as without us
        assert viewer.layers["hand-painted"].save(str(tmp_path / "hand.tif"), plugin=plugin) \
            == [str(tmp_path / "hand.tif")]
        assert get_reader(str(tmp_path / "hand.tif")) is None
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "hand.tif"), 1)


def test_segment_with_the_other_runs_of_a_cv_folder(tmp_path):
    """*with the other runs of its cv folder*: the cv's models together, as predict CV_FOLDER."""
    from cellseg_plugins.engine.predict import load_predictor, predict_array
    from test_ensemble import cv_folder

    folder, _ = cv_folder(tmp_path)
    image = np.random.default_rng(2).integers(0, 256, (64, 80), dtype=np.uint8)
    best = folder / "fold0_seed0" / "best.pt"
    labels, kwargs, _ = segment(layer(image), model=best, tile=64, cv_runs=True)
    np.testing.assert_array_equal(labels, predict_array(load_predictor(folder), image, tile=64))
    assert (labels != segment(layer(image), model=best, tile=64)[0]).any()
    assert kwargs["metadata"]["model"] == str(folder.resolve())
    (tmp_path / "lone" / "fold0_seed0").mkdir(parents=True)  # a cv folder of one run
    lone, _ = checkpoint(tmp_path / "lone" / "fold0_seed0", "classic_unet(width=4)", "best.pt")
    with pytest.raises(DataError, match="choose a run's best.pt in a cellseg cv folder"):
        segment(layer(image), model=lone, tile=64, cv_runs=True)
