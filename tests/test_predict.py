"""Tiled prediction: any image size, tiles blend to the untiled prediction; files in, files out."""

import re

import numpy as np
import pytest
import tifffile
import torch

import cellseg_plugins as cs
from cellseg_plugins.engine.predict import predict_image


@pytest.mark.parametrize("shape", [(10, 13), (33, 200), (300, 41)])
def test_tiled_prediction_any_size(shape):
    model = cs.create_model("fpn(encoder='resnet18')", classes=3)  # FPN needs sizes divisible by 32
    image = np.random.default_rng(0).random(shape).astype(np.float32)
    labels = predict_image(model, image, [0.5], [0.2], tile=64, overlap=8)
    assert labels.shape == shape and labels.dtype == np.uint8 and labels.max() < 3


def test_tiles_blend_to_the_untiled_prediction():
    torch.manual_seed(0)
    model = cs.create_model("unet(encoder='plain4')", classes=3).eval()
    image = np.random.default_rng(1).random((96, 96)).astype(np.float32)
    whole = predict_image(model, image, [0.5], [0.2], tile=96, overlap=0)
    tiled = predict_image(model, image, [0.5], [0.2], tile=64, overlap=32)
    assert (whole == tiled).mean() > 0.9  # same model, different tiling: near-identical labels


def _whole_image_blend(model, image, mean, std, tile, overlap):
    """The reference: every tile's weighted probabilities summed into one (classes, H, W)
    buffer for the whole image, then normalised and labelled (predict_image before it held
    one row of tiles at a time)."""
    from torch.nn import functional as F
    from cellseg_plugins.engine.predict import _ramp, tile_grid

    x = (torch.from_numpy(image)[None] - mean[0]) / std[0]
    h, w = image.shape
    tile, ph, pw, rows, cols = tile_grid(h, w, tile, overlap)
    mode = "reflect" if ph - h < h and pw - w < w else "replicate"
    x = F.pad(x[None], (0, pw - w, 0, ph - h), mode=mode)
    weight = _ramp(tile, min(overlap, tile // 2))
    probs, norm = 0, torch.zeros(ph, pw)
    for y0 in rows:
        for x0 in cols:
            with torch.no_grad():
                p = model(x[:, :, y0:y0 + tile, x0:x0 + tile]).softmax(1)[0]
            one = torch.zeros(p.shape[0], ph, pw)
            one[:, y0:y0 + tile, x0:x0 + tile] = p * weight
            probs = probs + one
            norm[y0:y0 + tile, x0:x0 + tile] += weight
    return (probs / norm).argmax(0)[:h, :w].numpy().astype(np.uint8)


@pytest.mark.parametrize("shape,tile,overlap", [((150, 97), 64, 16), ((64, 200), 64, 32),
                                                ((33, 40), 32, 0), ((190, 70), 64, 5)])
def test_row_by_row_blending_labels_as_the_whole_image_buffer(shape, tile, overlap):
    """predict_image holds the blended probabilities of one row of tiles, not of the whole
    image (classes × 4 bytes a pixel: 8 GB for a 20 000² section with 5 classes): its labels
    are the whole-image buffer's, pixel for pixel."""
    torch.manual_seed(0)
    model = cs.create_model("unet(encoder='plain4')", classes=4).eval()
    image = np.random.default_rng(2).random(shape).astype(np.float32)
    expected = _whole_image_blend(model, image, [0.5], [0.2], tile, overlap)
    labels = predict_image(model, image, [0.5], [0.2], tile=tile, overlap=overlap)
    assert labels.shape == shape and labels.flags.c_contiguous
    np.testing.assert_array_equal(labels, expected)


def _unit_reference(a):
    """The image scaled whole, as predict did before it scaled tiles: float32, RGBA without
    alpha, uint8/uint16 by their range, anything else by its min/max (0 if constant)."""
    a = a[..., :3] if a.ndim == 3 and a.shape[-1] == 4 else a
    f = a.astype(np.float32)
    if a.dtype in (np.uint8, np.uint16):
        return f / float(np.iinfo(a.dtype).max)
    lo, hi = float(f.min()), float(f.max())
    return (f - lo) / (hi - lo) if hi > lo else np.zeros_like(f)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float64", "int32", "rgba", "constant"])
def test_tiles_scaled_as_cut_are_the_image_scaled_whole(dtype, monkeypatch):
    """predict_array keeps the image as given (uint8: 1 byte a pixel, not a float32 copy of
    4) and scales each tile as it is cut, with the whole image's range (min/max over the whole
    image for floats): its labels are those of the whole image scaled first, pixel for pixel,
    for images smaller than a tile (padded) and larger."""
    from cellseg_plugins.engine import predict
    from cellseg_plugins.engine.data import scale_to_unit, unit_range
    from cellseg_plugins.engine.predict import predict_array
    from cellseg_plugins.input_rules import input_rules

    scaled = []  # the shapes of what is scaled to floats: tiles, never the large image
    monkeypatch.setattr(predict, "scale_to_unit",
                        lambda a, *r: scaled.append(a.shape[:2]) or scale_to_unit(a, *r))

    rng = np.random.default_rng(3)
    shape = (150, 97, 4) if dtype == "rgba" else (150, 97)
    image = {"uint8": lambda: rng.integers(0, 256, shape, dtype=np.uint8),
             "uint16": lambda: rng.integers(0, 65536, shape, dtype=np.uint16),
             "float64": lambda: rng.normal(50, 20, shape),
             "int32": lambda: rng.integers(-300, 9000, shape, dtype=np.int32),
             "rgba": lambda: rng.integers(0, 256, shape, dtype=np.uint8),
             "constant": lambda: np.full(shape, 7.5, np.float32)}[dtype]()
    np.testing.assert_array_equal(scale_to_unit(image[40:90, 10:60], *unit_range(image, "im")),
                                  _unit_reference(image)[40:90, 10:60])
    torch.manual_seed(0)
    channels = 3 if dtype == "rgba" else 1
    model = cs.create_model("unet(encoder='plain4')", classes=4, in_channels=channels).eval()
    predictor = (model, {"in_channels": channels, "norm": {"mean": [0.5] * channels,
                                                           "std": [0.2] * channels}},
                 input_rules(model))
    for part, tile in ((image, 64), (image[:40, :50], 64)):  # tiled, and padded to a tile
        labels = predict_array(predictor, part, rgb=dtype == "rgba", tile=tile, overlap=16)
        expected = predict_image(model, _unit_reference(part), [0.5] * channels,
                                 [0.2] * channels, tile=tile, overlap=16,
                                 rules=input_rules(model))
        np.testing.assert_array_equal(labels, expected)
        assert max(scaled) == (min(tile, part.shape[0]), min(tile, part.shape[1]))
        scaled.clear()


def _images(folder):
    """One file of each layout predict takes: grey, 16-bit, RGB(A) (planar too), palette, grey
    with alpha, JPEG, BMP, stacks and a Z × C hyperstack."""
    import tifffile
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir()
    u8 = lambda *shape: (rng.random(shape) * 255).astype(np.uint8)  # noqa: E731
    tifffile.imwrite(folder / "grey.tif", u8(20, 30))
    tifffile.imwrite(folder / "float.tif", rng.random((20, 30)).astype(np.float32) * 1e4)
    tifffile.imwrite(folder / "stack.tif", u8(3, 20, 30), photometric="minisblack")
    tifffile.imwrite(folder / "imagej.tif", u8(4, 20, 30), imagej=True)
    tifffile.imwrite(folder / "rgb_stack.tif", u8(2, 20, 30, 3), photometric="rgb")
    Image.fromarray((rng.random((20, 30)) * 60000).astype(np.uint16)).save(folder / "g16.png")
    Image.fromarray(u8(20, 30, 4)).save(folder / "rgba.png")
    Image.fromarray(u8(20, 30)).convert("P").save(folder / "palette.png")
    Image.fromarray(u8(20, 30, 2), mode="LA").save(folder / "grey_alpha.png")
    Image.fromarray(u8(20, 30)).save(folder / "photo.jpg")
    Image.fromarray(u8(20, 30)).save(folder / "scan.bmp")
    tifffile.imwrite(folder / "alpha_grey.tif", u8(20, 30, 2), photometric="minisblack",
                     extrasamples=["unassalpha"])
    tifffile.imwrite(folder / "hyper.tif", u8(5, 2, 20, 30), imagej=True,
                     metadata={"axes": "ZCYX"})
    tifffile.imwrite(folder / "planar_rgb.tif", u8(3, 20, 30), photometric="rgb",
                     planarconfig="separate")
    return sorted(folder.iterdir())


def test_image_headers_give_the_shape_of_the_pixels(tmp_path):
    from cellseg_plugins.engine.image_files import image_shape, read_image

    for path in _images(tmp_path / "in"):
        assert image_shape(path) == read_image(path).shape, path.name


def test_tiff_layouts_by_their_axes(tmp_path):
    """TIFFs are read by their axes: samples (RGB, planar RGB, grey + alpha) last, as in PNGs,
    alpha dropped; every axis before Y (Z × C of a hyperstack) one axis of pages."""
    from cellseg_plugins.engine.image_files import read_image

    _images(tmp_path / "in")
    raw = {name: tifffile.imread(tmp_path / "in" / name)
           for name in ("alpha_grey.tif", "hyper.tif", "planar_rgb.tif", "rgb_stack.tif")}
    read = {name: read_image(tmp_path / "in" / name) for name in raw}
    assert raw["alpha_grey.tif"].shape == (20, 30, 2)
    np.testing.assert_array_equal(read["alpha_grey.tif"], raw["alpha_grey.tif"][..., 0])
    assert raw["hyper.tif"].shape == (5, 2, 20, 30)
    np.testing.assert_array_equal(read["hyper.tif"], raw["hyper.tif"].reshape(10, 20, 30))
    assert raw["planar_rgb.tif"].shape == (3, 20, 30)
    np.testing.assert_array_equal(read["planar_rgb.tif"], np.moveaxis(raw["planar_rgb.tif"], 0, -1))
    np.testing.assert_array_equal(read["rgb_stack.tif"], raw["rgb_stack.tif"])


def _more_tiffs(folder):
    """TIFF layouts beside :func:`_images`': an OME stack (T × Z), a tiled zlib-compressed
    stack, planar RGB pages, and ImageJ stacks stored as one page (as ImageJ writes files
    over 4 GB: grey, big-endian 16-bit, a Z × C hyperstack, RGB), read a section at a time."""
    rng = np.random.default_rng(1)
    u8 = lambda *shape: (rng.random(shape) * 255).astype(np.uint8)  # noqa: E731
    tifffile.imwrite(folder / "ome.ome.tif", u8(2, 3, 20, 30), metadata={"axes": "TZYX"})
    tifffile.imwrite(folder / "tiled.tif", u8(3, 64, 64), photometric="minisblack",
                     tile=(32, 32), compression="zlib")
    tifffile.imwrite(folder / "planar_stack.tif", u8(2, 3, 20, 30), photometric="rgb",
                     planarconfig="separate")
    tifffile.imwrite(folder / "one_page_imagej.tif", u8(6, 20, 30), imagej=True, truncate=True)
    tifffile.imwrite(folder / "one_page_imagej_be16.tif", u8(6, 20, 30).astype(np.uint16) * 257,
                     imagej=True, truncate=True, byteorder=">")
    tifffile.imwrite(folder / "one_page_imagej_zc.tif", u8(2, 3, 20, 30), imagej=True,
                     truncate=True, metadata={"axes": "ZCYX"})
    tifffile.imwrite(folder / "one_page_imagej_rgb.tif", u8(4, 20, 30, 3), imagej=True,
                     truncate=True, photometric="rgb")
    return (["ome.ome.tif", "tiled.tif", "planar_stack.tif"],
            ["one_page_imagej.tif", "one_page_imagej_be16.tif", "one_page_imagej_zc.tif",
             "one_page_imagej_rgb.tif"])


def test_planes_are_decoded_page_by_page_as_read_image_lays_them_out(tmp_path, monkeypatch):
    """read_planes gives read_image's pages (or its one image) in order, in native byte order;
    a TIFF whose pages each hold one image, or an uncompressed stack stored in one page (read
    a section at a time from its bytes), is never decoded whole; one-image files are."""
    from cellseg_plugins.engine.image_files import image_shape, is_stack, read_image, read_planes

    paths = _images(tmp_path / "in")
    paged, contiguous = _more_tiffs(tmp_path / "in")
    paged += ["stack.tif", "imagej.tif", "hyper.tif", "rgb_stack.tif"]
    for path in sorted((tmp_path / "in").iterdir()):
        whole = read_image(path)
        planes = list(read_planes(path))
        expected = list(whole) if is_stack(whole.shape) else [whole]
        assert len(planes) == len(expected) > 0, path.name
        for plane, page in zip(planes, expected):
            np.testing.assert_array_equal(plane, page, err_msg=path.name)
            assert plane.dtype == page.dtype and plane.dtype.isnative and \
                type(plane) is np.ndarray, path.name
    whole_reads = []
    real = tifffile.TiffPageSeries.asarray
    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray",
                        lambda self, *a, **k: whole_reads.append(self.parent.filehandle.name)
                        or real(self, *a, **k))
    for path in sorted((tmp_path / "in").iterdir()):
        list(read_planes(path))
    assert not set(whole_reads) & set(paged + contiguous)
    assert {"alpha_grey.tif", "planar_rgb.tif"} <= set(whole_reads)  # one image each
    assert {p.name for p in paths if p.suffix == ".tif" and is_stack(image_shape(p))
            } <= set(paged)  # every stack of _images is among those read page by page


@pytest.mark.parametrize("truncate", [False, True], ids=["pages", "imagej_one_page"])
def test_a_stack_is_predicted_and_written_a_page_at_a_time(tmp_path, monkeypatch, truncate):
    """cellseg predict on a stack (a page a section, or stored in one page as ImageJ writes
    files over 4 GB): each page's labels are those of the page alone, written as they come
    (the stack is never decoded whole); a failure on a later page leaves no label file,
    overlay or temporary file behind."""
    from PIL import Image

    from cellseg_plugins.engine import predict
    from conftest import checkpoint

    ckpt, _ = checkpoint(tmp_path, "classic_unet(width=4)")
    rng = np.random.default_rng(2)
    stack = (rng.random((4, 40, 50)) * 255).astype(np.uint8)
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "sections.tif", stack, imagej=True, truncate=truncate)
    with tifffile.TiffFile(tmp_path / "in" / "sections.tif") as f:
        assert len(f.pages) == (1 if truncate else 4)
    for k, page in enumerate(stack):
        tifffile.imwrite(tmp_path / "in" / f"page{k}.tif", page)
    pages = predict.predict_paths(ckpt, [str(tmp_path / "in" / f"page{k}.tif") for k in range(4)],
                                  tmp_path / "pages", tile=32, overlap=8, with_overlay=True)
    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", None)  # would be a TypeError
    (written,) = predict.predict_paths(ckpt, [str(tmp_path / "in" / "sections.tif")],
                                       tmp_path / "out", tile=32, overlap=8, with_overlay=True)
    labels = tifffile.imread(written)
    assert labels.shape == (4, 40, 50) and labels.dtype == np.uint8
    for k, page in enumerate(pages):
        np.testing.assert_array_equal(labels[k], tifffile.imread(page))
        overlay = np.asarray(Image.open(tmp_path / "out" / f"sections_{k}_overlay.png"))
        np.testing.assert_array_equal(overlay, np.asarray(
            Image.open(tmp_path / "pages" / f"page{k}_overlay.png")))
    assert predict.labels_info(written)["class_names"]  # the model's metadata travels

    real, calls = predict.predict_image, []

    def fail_on_page_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(predict, "predict_image", fail_on_page_3)
    with pytest.raises(RuntimeError, match="out of memory"):
        predict.predict_paths(ckpt, [str(tmp_path / "in" / "sections.tif")], tmp_path / "failed",
                              tile=32, overlap=8, with_overlay=True)
    assert len(calls) == 3 and list((tmp_path / "failed").iterdir()) == []


@pytest.mark.parametrize("unit, per_cm", [("um", 1e4), ("micron", 1e4), ("\\u00B5m", 1e4),
                                           ("nm", 1e7), ("pixel", None)])
def test_a_label_tiff_keeps_the_pixel_size_of_its_image(tmp_path, unit, per_cm):
    """Fiji's calibration of a stack (4 nm pixels, 50 nm sections: its unit and Z spacing in
    the ImageJ description, ResolutionUnit "none" in the tags) comes out as Fiji writes it in
    µm (250 pixels per µm, spacing 0.05), which reads back as pixels per centimetre; a unit
    that is no length (ImageJ's "pixel") stays relative; other TIFFs' resolution tags are
    copied; a PNG's labels are uncalibrated."""
    from PIL import Image

    from cellseg_plugins.engine.image_files import pixel_calibration
    from cellseg_plugins.engine.predict import predict_paths
    from conftest import checkpoint

    ckpt, _ = checkpoint(tmp_path, "classic_unet(width=4)")
    (tmp_path / "in").mkdir()
    image = np.zeros((2, 40, 50), np.uint8)
    size, step = (0.004, 0.05) if per_cm == 1e4 else (4.0, 50.0)  # the same 4 nm, 50 nm
    tifffile.imwrite(tmp_path / "in" / "fiji.tif", image, imagej=True,
                     resolution=(1 / size, 1 / size),
                     metadata={"unit": unit, "spacing": step, "axes": "ZYX"})
    tifffile.imwrite(tmp_path / "in" / "scanner.tif", image[0], resolution=(300, 600),
                     resolutionunit="INCH")
    Image.fromarray(image[0]).save(tmp_path / "in" / "photo.png")
    written = predict_paths(ckpt, [str(tmp_path / "in")], tmp_path / "out", tile=32, overlap=8)
    labels = {path.stem: path for path in written}
    with tifffile.TiffFile(labels["fiji"]) as f:
        x, y = f.pages.first.get_resolution()
        assert int(f.pages.first.resolutionunit) == 1 and f.series[0].axes == "ZYX"
        if per_cm is None:
            assert (x, y) == pytest.approx((0.25,) * 2) and "unit" not in f.imagej_metadata
        else:
            assert (x, y) == pytest.approx((250, 250), rel=1e-6)  # pixels per µm
            assert f.imagej_metadata["unit"] == "micron"
            assert f.imagej_metadata["spacing"] == 0.05  # as Fiji shows it, not 0.0499…
    fiji = pixel_calibration(labels["fiji"])
    if per_cm:
        assert fiji["resolution"] == pytest.approx((2.5e6, 2.5e6), rel=1e-6)
        assert fiji["resolutionunit"] == 3 and fiji["spacing"] == pytest.approx(5e-6)  # cm
    else:
        assert "spacing" not in fiji  # a spacing in pixels is no length
    assert pixel_calibration(labels["scanner"]) == {"resolution": (300.0, 600.0),
                                                    "resolutionunit": 2}
    assert pixel_calibration(labels["photo"]) == {"resolution": (1.0, 1.0),
                                                  "resolutionunit": 1}  # tifffile's default
    assert pixel_calibration(tmp_path / "in" / "photo.png") is None


def _mrc(path, data, voxel=0.0, imod_flags=None):
    """An MRC file of ``data`` (3-D: a stack of sections), stamped as IMOD stamps its files
    when ``imod_flags`` is given."""
    import mrcfile

    from cellseg_plugins.engine.mrc import IMOD_STAMP

    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        if data.ndim == 3:
            mrc.set_image_stack()
        mrc.voxel_size = voxel
        if imod_flags is not None:
            extra = bytearray(mrc.header.extra2.tobytes())  # header bytes 112-195
            extra[40:48] = np.array([IMOD_STAMP, imod_flags], "<i4").tobytes()
            mrc.header.extra2 = bytes(extra)


@pytest.mark.parametrize("flags, dtype", [(0, np.uint8), (1, np.int8), (None, np.int8)])
def test_mrc_bytes_are_unsigned_where_imod_says_so(tmp_path, flags, dtype):
    """IMOD (and SerialEM) write unsigned bytes in mode 0 and flag signed ones; the MRC2014
    standard, and mrcfile, read every mode-0 file as signed, so an IMOD stack's bright
    pixels (128-255) would come out negative and the darkest."""
    from cellseg_plugins.engine.image_files import image_shape, pixel_kind, read_image, read_planes

    sections = np.arange(3 * 16 * 16, dtype=np.uint32).reshape(3, 16, 16).astype(np.uint8)
    _mrc(tmp_path / "em.st", sections.view(np.int8), imod_flags=flags)
    image = read_image(tmp_path / "em.st")
    assert image.dtype == dtype and image_shape(tmp_path / "em.st") == (3, 16, 16)
    np.testing.assert_array_equal(image.view(np.uint8), sections)
    assert pixel_kind(tmp_path / "em.st") == np.dtype(dtype).kind
    planes = list(read_planes(tmp_path / "em.st"))
    assert len(planes) == 3 and all(p.dtype == dtype for p in planes)
    np.testing.assert_array_equal(np.stack(planes), image)


def test_an_mrc_stack_is_labelled_as_the_same_tiff_stack_with_its_pixel_size(tmp_path):
    """An MRC stack of sections (uint16, 4 nm pixels and sections: 40 Å in its header) gives
    the labels of the same pixels in a TIFF stack, a page a section, with the pixel size and
    section spacing; a stack of volumes keeps its two axes (V, Z, H, W) as a TIFF hyperstack
    does."""
    from cellseg_plugins.engine.image_files import pixel_calibration
    from cellseg_plugins.engine.predict import labels_info, predict_paths
    from conftest import checkpoint

    ckpt, _ = checkpoint(tmp_path, "classic_unet(width=4)")
    rng = np.random.default_rng(3)
    sections = (rng.random((3, 40, 50)) * 65535).astype(np.uint16)
    (tmp_path / "in").mkdir()
    _mrc(tmp_path / "in" / "em.mrc", sections, voxel=40.0)
    tifffile.imwrite(tmp_path / "em.tif", sections, photometric="minisblack")
    volumes = rng.random((2, 2, 32, 32)).astype(np.float32)
    _mrc(tmp_path / "in" / "tomos.mrcs", volumes)
    written = predict_paths(ckpt, [str(tmp_path / "in")], tmp_path / "out", tile=32, overlap=8)
    labels = {path.name: tifffile.imread(path) for path in written}
    (reference,) = predict_paths(ckpt, [str(tmp_path / "em.tif")], tmp_path / "ref", tile=32,
                                 overlap=8)
    np.testing.assert_array_equal(labels["em.tif"], tifffile.imread(reference))
    assert labels["em.tif"].shape == (3, 40, 50) and labels["tomos.tif"].shape == (2, 2, 32, 32)
    em = pixel_calibration(tmp_path / "out" / "em.tif")
    assert em["resolution"] == pytest.approx((2.5e6, 2.5e6))  # 1e8 Å a cm / 40 Å
    assert em["spacing"] == pytest.approx(4e-7)  # 40 Å sections, in cm
    with tifffile.TiffFile(tmp_path / "out" / "tomos.tif") as f:
        assert f.series[0].axes == "TZYX"  # volumes as ImageJ's frames, sections as slices
    assert pixel_calibration(tmp_path / "out" / "tomos.tif")["resolutionunit"] == 1  # none
    assert labels_info(tmp_path / "out" / "em.tif")["spec"] == "classic_unet(width=4)"


def test_predict_checks_every_header_first_then_reads_one_image_at_a_time(tmp_path, monkeypatch):
    from cellseg_plugins.engine import predict
    from conftest import checkpoint

    ckpt, _ = checkpoint(tmp_path, "classic_unet(width=4)")
    paths = [p for p in _images(tmp_path / "in") if "rgb" not in p.name]
    log, ticks, shapes = [], [], []
    real = predict.read_planes
    monkeypatch.setattr(predict, "read_planes", lambda p: log.append(("read", p.name)) or real(p))
    written = predict.predict_paths(
        ckpt, [str(p) for p in paths], tmp_path / "out", tile=32, overlap=8,
        on_image=lambda p, target, shape: log.append(("done", p.name)) or shapes.append(shape),
        progress=lambda done, total: ticks.append((done, total)))
    # first the pixels that need a check (the float file's NaN or inf, a palette PNG's colours
    # for a grey model); then each image read just before its labels, after the last is done
    checked = [("read", "float.tif"), ("read", "palette.png")]
    assert log == checked + [(event, p.name) for p in paths for event in ("read", "done")]
    pages = {"stack.tif": (3,), "imagej.tif": (4,), "hyper.tif": (5, 2)}  # Z × C kept
    assert shapes == [pages.get(p.name, ()) + (20, 30) for p in paths]
    total = sum(int(np.prod(pages.get(p.name, (1,)))) for p in paths)  # 1 tile a 20×30 page
    assert ticks == [(k, total) for k in range(1, total + 1)]  # known from the headers
    for path, out in zip(paths, written):
        assert out.name == f"{path.stem}.tif"
        labels = tifffile.imread(out)
        assert labels.shape == pages.get(path.name, ()) + (20, 30)
        with tifffile.TiffFile(out) as f:  # 3 or 4 label pages are pages, not RGB(A) samples
            assert "S" not in f.series[0].axes, (out.name, f.series[0].axes)
    log.clear()
    with pytest.raises(predict.DataError, match="planar_rgb.tif: 3 channel"):  # 10th of 14
        predict.predict_paths(ckpt, [str(tmp_path / "in")], tmp_path / "refused", tile=32,
                              overlap=8)  # only the pixels that had to be checked were read
    assert log == checked + [("read", "planar_rgb.tif")]
    assert not (tmp_path / "refused").exists()


def test_images_past_pillows_decompression_bomb_limit_are_read(tmp_path, monkeypatch):
    """Pillow refuses images past 2 × Image.MAX_IMAGE_PIXELS (179 megapixels: a 14 000² EM
    montage) as a "decompression bomb" and warns past 1 ×; a user's own image is read, without
    a warning, and the limit stays as it was for everything else. The limit is lowered here to
    make a 40 × 50 PNG that large."""
    import warnings

    from PIL import Image

    from cellseg_plugins.engine import predict
    from cellseg_plugins.engine.image_files import image_shape, pixel_kind, read_image
    from conftest import checkpoint

    ckpt, _ = checkpoint(tmp_path, "classic_unet(width=4)")
    image = (np.random.default_rng(0).random((40, 50)) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "montage.png")
    tifffile.imwrite(tmp_path / "montage.tif", image)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(tmp_path / "montage.png")
    path = tmp_path / "montage.png"
    decoding = []  # the limit while the pixels are decoded: the user's, not lifted
    monkeypatch.setattr(Image.Image, "load", lambda im, load=Image.Image.load: (
        decoding.append(Image.MAX_IMAGE_PIXELS), load(im))[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        assert image_shape(path) == (40, 50) and pixel_kind(path) == "u"
        np.testing.assert_array_equal(read_image(path), image)
        (png_labels,) = predict.predict_paths(ckpt, [str(path)], tmp_path / "png", tile=32,
                                              overlap=8)
    (tif_labels,) = predict.predict_paths(ckpt, [str(tmp_path / "montage.tif")],
                                          tmp_path / "tif", tile=32, overlap=8)
    np.testing.assert_array_equal(tifffile.imread(png_labels), tifffile.imread(tif_labels))
    assert Image.MAX_IMAGE_PIXELS == 500 and decoding and set(decoding) == {500}


def test_grey_saved_as_rgb_feeds_a_grey_model_and_grey_feeds_a_colour_one(tmp_path):
    """Grey with alpha (LA) and grey saved as RGB(A) or as a palette give a grey model the
    labels of the grey file; a colour model takes a grey file as RGB with equal channels; a
    colour image for a grey model is one line before anything is written."""
    from PIL import Image

    from cellseg_plugins.engine import predict
    from conftest import checkpoint

    rng = np.random.default_rng(0)
    grey = (rng.random((40, 48)) * 255).astype(np.uint8)
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(grey).save(folder / "grey.png")
    Image.fromarray(np.dstack([grey, grey, grey])).save(folder / "rgb.png")
    Image.fromarray(np.dstack([grey, grey, grey, grey // 2])).save(folder / "rgba.png")
    Image.fromarray(np.dstack([grey, grey // 2]), mode="LA").save(folder / "alpha.png")
    Image.fromarray(grey).convert("P").save(folder / "palette.png")
    files = sorted(folder.iterdir())
    for in_channels in (1, 3):
        ckpt, _ = checkpoint(tmp_path, "classic_unet(width=4)", name=f"m{in_channels}.pt",
                             in_channels=in_channels)
        written = predict.predict_paths(ckpt, [str(folder)], tmp_path / f"out{in_channels}",
                                        tile=32, overlap=8)
        labels = {p.stem: tifffile.imread(p) for p in written}
        assert sorted(labels) == [p.stem for p in files]
        assert all(np.array_equal(v, labels["grey"]) for v in labels.values()), in_channels
        assert len(np.unique(labels["grey"])) > 1  # not a constant the check would miss
        array = predict.predict_array(predict.load_predictor(ckpt), np.dstack([grey] * 3),
                                      rgb=True, tile=32, overlap=8)
        assert np.array_equal(array, labels["grey"])
    colour = np.dstack([grey, grey, 255 - grey])
    Image.fromarray(colour).save(folder / "zcolour.png")
    ckpt = tmp_path / "m1.pt"
    with pytest.raises(predict.DataError) as err:
        predict.predict_paths(ckpt, [str(folder)], tmp_path / "refused", tile=32, overlap=8)
    assert str(err.value) == (f"{folder / 'zcolour.png'}: 3 channel(s), the model expects 1 "
                              "(a colour image, not grey saved as RGB)")
    assert not (tmp_path / "refused").exists()
    with pytest.raises(predict.DataError, match="the model expects 1 \\(a colour image"):
        predict.predict_array(predict.load_predictor(ckpt), colour, rgb=True, tile=32,
                              overlap=8)


def test_an_overlap_above_half_the_tile_is_one_line(tmp_path, capsys):
    """--tile 33 with the default overlap 32 stepped one pixel at a time (45 000 tiles for
    300×200 on a model that takes any size); the ramps span at most half a tile."""
    from conftest import checkpoint, cli

    ckpt, _ = checkpoint(tmp_path, "classic_unet(width=4)")
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((40, 48), np.uint8))
    for tile, overlap in ((33, 32), (64, 33)):
        code, _, err = cli(capsys, "predict", ckpt, tmp_path / "a.tif", "--out", tmp_path / "out",
                           "--tile", tile, "--overlap", overlap)
        assert code == 2 and err == (f"error: --overlap {overlap}: must be in [0, {tile // 2}] "
                                     f"(at most half of the tile, {tile})\n"), err
    assert not (tmp_path / "out").exists()
    code, _, err = cli(capsys, "predict", ckpt, tmp_path / "a.tif", "--out", tmp_path / "out",
                       "--tile", 64, "--overlap", 32)
    assert code == 0 and (tmp_path / "out" / "a.tif").is_file(), err


def test_an_image_with_nan_pixels_is_one_line(tmp_path):
    from cellseg_plugins.engine import predict
    from conftest import checkpoint

    ckpt, _ = checkpoint(tmp_path, "classic_unet(width=4)")
    image = np.ones((40, 48), np.float32)
    tifffile.imwrite(tmp_path / "a_fine.tif", image)
    image[7, 3] = np.nan
    tifffile.imwrite(tmp_path / "holes.tif", image)
    with pytest.raises(predict.DataError) as err:  # the fine image first: nothing written
        predict.predict_paths(ckpt, [str(tmp_path / "a_fine.tif"), str(tmp_path / "holes.tif")],
                              tmp_path / "out", tile=32, overlap=8)
    assert str(err.value) == (f"{tmp_path / 'holes.tif'}: 1 pixel(s) are NaN or infinite (the "
                              "first at (7, 3): nan); replace them with a finite value")
    assert not (tmp_path / "out").exists()
    with pytest.raises(predict.DataError, match="image of shape \\(40, 48\\): 1 pixel"):
        predict.predict_array(predict.load_predictor(ckpt), image, tile=32, overlap=8)


def test_pixels_that_are_not_numbers_are_one_line_before_anything_is_written(tmp_path):
    """Complex pixels lost their imaginary part with a NumPy warning and were segmented;
    dates and text became numbers or a ValueError traceback."""
    from cellseg_plugins.engine import predict
    from conftest import checkpoint

    ckpt, _ = checkpoint(tmp_path, "classic_unet(width=4)")
    tifffile.imwrite(tmp_path / "a_fine.tif", np.ones((40, 48), np.uint8))
    tifffile.imwrite(tmp_path / "fft.tif", np.ones((40, 48), np.complex64))
    with pytest.raises(predict.DataError) as err:
        predict.predict_paths(ckpt, [str(tmp_path / "a_fine.tif"), str(tmp_path / "fft.tif")],
                              tmp_path / "out", tile=32, overlap=8)
    assert str(err.value) == (f"{tmp_path / 'fft.tif'}: pixels of type complex64; expected "
                              "integer or floating-point pixels (of a complex image, pass its "
                              "magnitude)")
    assert not (tmp_path / "out").exists()
    predictor = predict.load_predictor(ckpt)
    for array in (np.zeros((40, 48), "datetime64[s]"), np.full((40, 48), "a", object)):
        with pytest.raises(predict.DataError, match=re.escape(f"type {array.dtype}; expected")):
            predict.predict_array(predictor, array, tile=32, overlap=8)
    for array in (np.ones((40, 48), bool), np.ones((40, 48), ">f4"), np.ones((40, 48), np.int8)):
        assert predict.predict_array(predictor, array, tile=32, overlap=8).shape == (40, 48)


def test_a_tiff_of_separate_images_is_one_line_before_anything_is_written(tmp_path, capsys):
    """Pages of different sizes (or OME positions) are separate image series in tifffile;
    only the first was read: `cellseg predict` labelled two of a file's three sections and
    training took one image of a folder's file. Such a file is now one line, naming the
    images, in predict (nothing written) and in a training folder; a thumbnail stored as a
    reduced-resolution page is not a separate image."""
    from cellseg_plugins.cli.main import main
    from cellseg_plugins.engine.data import load_folder
    from cellseg_plugins.engine.image_files import image_shape, read_image
    from cellseg_plugins.errors import DataError
    from conftest import checkpoint

    ckpt, _ = checkpoint(tmp_path, "classic_unet(width=4)")
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "a_fine.tif", np.ones((40, 48), np.uint8))
    with tifffile.TiffWriter(tmp_path / "in" / "sections.tif") as tif:
        for shape in ((40, 48), (32, 50), (40, 48)):
            tif.write(np.zeros(shape, np.uint8), photometric="minisblack", metadata=None)
    with tifffile.TiffWriter(tmp_path / "in" / "thumbnail.tif") as tif:
        tif.write(np.ones((40, 48), np.uint8), photometric="minisblack")
        tif.write(np.ones((10, 12), np.uint8), photometric="minisblack", subfiletype=1)
    assert image_shape(tmp_path / "in" / "thumbnail.tif") == (40, 48)
    assert read_image(tmp_path / "in" / "thumbnail.tif").shape == (40, 48)
    line = (f"{tmp_path / 'in' / 'sections.tif'}: 2 image series in one TIFF (2×40×48, 32×50); "
            "cellseg reads a file's one image or one stack of same-size pages: save each series "
            "as its own file")
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(ckpt), str(tmp_path / "in"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code != 0
    assert capsys.readouterr().err == f"error: {line}\n"
    assert not (tmp_path / "out").exists()
    for name in ("images", "masks"):
        (tmp_path / "data" / name).mkdir(parents=True)
    tifffile.imwrite(tmp_path / "data" / "images" / "a.tif", np.ones((40, 48), np.uint8))
    tifffile.imwrite(tmp_path / "data" / "masks" / "a.tif", np.ones((40, 48), np.uint8))
    (tmp_path / "in" / "sections.tif").rename(tmp_path / "data" / "images" / "b.tif")
    tifffile.imwrite(tmp_path / "data" / "masks" / "b.tif", np.ones((40, 48), np.uint8))
    with pytest.raises(DataError, match=re.escape("b.tif: 2 image series in one TIFF")):
        load_folder(tmp_path / "data")


def test_predict_arrays_tile_and_overlap_must_be_integers(tmp_path):
    from cellseg_plugins.engine import predict
    from conftest import checkpoint

    predictor = predict.load_predictor(checkpoint(tmp_path, "classic_unet(width=4)")[0])
    for kw, message in ((dict(tile=64.5), "tile=64.5: must be an integer (pixels)"),
                        (dict(tile="64"), "tile='64': must be an integer (pixels)"),
                        (dict(tile=64, overlap=True), "overlap=True: must be an integer")):
        with pytest.raises(predict.ConfigError, match=re.escape(message)):
            predict.predict_array(predictor, np.ones((40, 48)), **kw)
    labels = predict.predict_array(predictor, np.ones((40, 48)), tile=np.int64(32), overlap=8)
    assert labels.shape == (40, 48)


def test_the_python_apis_device_is_checked_and_defaults_to_the_models(tmp_path, monkeypatch):
    """load_predictor / predict_array took any device to torch: 'gpu' was torch's RuntimeError
    traceback, a model loaded on the GPU got CPU tiles. Now: one line naming the value, the
    tiles follow the model, and a device that is not the model's is refused naming both."""
    from cellseg_plugins.engine import predict
    from conftest import checkpoint

    ckpt = checkpoint(tmp_path, "classic_unet(width=4)")[0]
    for device, message in (("gpu", "device='gpu': expected auto, cpu or cuda"),
                            ("cuda:1", "cuda (choose the GPU with CUDA_VISIBLE_DEVICES)"),
                            (0, "device=0: expected auto, cpu or cuda")):
        with pytest.raises(predict.ConfigError, match=re.escape(message)):
            predict.load_predictor(ckpt, device=device)
    image = np.random.default_rng(0).random((40, 48))
    torch_model = predict.load_predictor(ckpt, device=torch.device("cpu"))
    onnx_model = predict.load_predictor(ckpt, runtime="onnx", device="auto")  # auto: the CPU
    expected = predict.predict_array(torch_model, image, tile=32, overlap=8)
    assert (predict.predict_array(onnx_model, image, tile=32, overlap=8) == expected).mean() > 0.99
    assert (predict.predict_array(torch_model, image, tile=32, overlap=8, device="auto")
            == expected).all()
    with pytest.raises(predict.ConfigError, match="device='tpu': expected auto, cpu or cuda"):
        predict.predict_array(torch_model, image, tile=32, overlap=8, device="tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU the model is not on
    for predictor, message in (
            (torch_model, "device='cuda': the model is on cpu: load it with "
                          "load_predictor(..., device='cuda')"),
            (onnx_model, "device='cuda': ONNX Runtime runs on the CPU")):
        with pytest.raises(predict.ConfigError, match=re.escape(message)):
            predict.predict_array(predictor, image, tile=32, overlap=8, device="cuda")
    with pytest.raises(predict.ConfigError, match="ONNX Runtime runs on the CPU"):
        predict.load_predictor(ckpt, runtime="onnx", device="cuda")


def test_a_folder_given_as_the_checkpoint_names_the_file_to_pass(tmp_path):
    from cellseg_plugins.engine.checkpoint import load_checkpoint
    from cellseg_plugins.engine.data import DataError
    from conftest import checkpoint

    (tmp_path / "run").mkdir()
    with pytest.raises(DataError) as err:
        load_checkpoint(tmp_path / "run")
    assert str(err.value) == (f"checkpoint {str(tmp_path / 'run')!r} is a folder, not a "
                              "checkpoint file (a .pt file that training writes)")
    checkpoint(tmp_path / "run", "classic_unet(width=4)", name="best.pt")
    with pytest.raises(DataError) as err:  # what "does not exist" said of a run folder before
        load_checkpoint(tmp_path / "run")
    assert str(err.value) == (f"checkpoint {str(tmp_path / 'run')!r} is a folder: pass "
                              f"{str(tmp_path / 'run' / 'best.pt')!r} (or last.pt)")


def test_a_data_set_folder_given_to_predict_points_to_its_images(tmp_path):
    from PIL import Image

    from cellseg_plugins.engine import predict

    (tmp_path / "ds" / "Images").mkdir(parents=True)
    (tmp_path / "ds" / "masks").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "ds" / "Images" / "a.png")
    with pytest.raises(predict.DataError) as err:
        predict.input_paths([str(tmp_path / "ds")])
    assert str(err.value) == (f"no PNG, TIFF, MRC, JPEG or BMP images in {tmp_path / 'ds'} (its "
                              "images are in "
                              f"'{tmp_path / 'ds' / 'Images'}')")


def test_ctrl_c_during_predict_says_what_is_on_disk(tmp_path, capsys, monkeypatch):
    from cellseg_plugins.cli.main import main
    from cellseg_plugins.engine import predict
    from conftest import checkpoint

    ckpt, _ = checkpoint(tmp_path, "classic_unet(width=4)")
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((32, 32), np.uint8))

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(predict, "predict_image", interrupt)
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(ckpt), str(tmp_path / "a.tif"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == ("error: interrupted; the label files written so far are "
                                       "whole: the same command with --resume keeps them and "
                                       "writes the rest\n")


def test_predict_resume_keeps_what_the_same_model_and_settings_wrote(tmp_path, capsys,
                                                                      monkeypatch):
    """An interrupted batch goes on where it stopped: --resume keeps a label file (and its
    overlay) that the same model file, runtime, tile and overlap wrote, and predicts the rest;
    another model, other settings, a missing overlay or a cut label file are written again."""
    from cellseg_plugins.cli.main import main
    from cellseg_plugins.engine import predict
    from conftest import checkpoint

    ckpt, _ = checkpoint(tmp_path, "classic_unet(width=4)")
    other, _ = checkpoint(tmp_path, "classic_unet(width=8)", name="other.pt")
    (tmp_path / "in").mkdir()
    rng = np.random.default_rng(4)
    for name in "abc":
        tifffile.imwrite(tmp_path / "in" / f"{name}.tif",
                         (rng.random((2, 40, 50)) * 255).astype(np.uint8),
                         photometric="minisblack")
    real, predicted = predict.predict_image, []

    def interrupted_at_c(image, *args, **kwargs):
        if len(predicted) == 4:  # a and b written, c's first page
            raise KeyboardInterrupt
        predicted.append(1)
        return real(image, *args, **kwargs)

    def run(*options, ckpt=ckpt):
        predicted.clear()
        with pytest.raises(SystemExit) as exit_info:
            main(["predict", str(ckpt), str(tmp_path / "in"), "--out", str(tmp_path / "out"),
                  "--tile", "32", "--overlap", "8", *options])
        return exit_info.value.code, capsys.readouterr()

    monkeypatch.setattr(predict, "predict_image", interrupted_at_c)
    code, _ = run("--overlay")
    assert code == 130 and sorted(p.name for p in (tmp_path / "out").glob("*.tif")) == \
        ["a.tif", "b.tif"]
    monkeypatch.setattr(predict, "predict_image", real)
    before = {n: (tmp_path / "out" / f"{n}.tif").stat().st_mtime_ns for n in "ab"}
    (tmp_path / "out" / "b_1_overlay.png").unlink()  # b's overlays are not whole: b again
    monkeypatch.setattr(predict, "predict_image", lambda *a, **k: predicted.append(1) or
                        real(*a, **k))
    code, out = run("--overlay", "--resume")
    assert code == 0 and len(predicted) == 4, out.err  # b's and c's two pages
    assert " ".join(out.err.split()).count("(kept: this model wrote it already)") == 1  # a
    assert (tmp_path / "out" / "a.tif").stat().st_mtime_ns == before["a"]
    assert (tmp_path / "out" / "b.tif").stat().st_mtime_ns != before["b"]
    assert (tmp_path / "out" / "b_1_overlay.png").is_file()
    reference = predict.predict_paths(ckpt, [str(tmp_path / "in")], tmp_path / "ref", tile=32,
                                      overlap=8)
    for path in reference:  # what --resume kept and wrote: the labels of one whole run
        np.testing.assert_array_equal(tifffile.imread(path),
                                      tifffile.imread(tmp_path / "out" / path.name))

    assert run("--overlay", "--resume")[0] == 0 and predicted == []  # all kept
    assert run("--resume")[0] == 0 and predicted == []  # overlays not asked: kept too
    assert run("--resume", "--tile", "64")[0] == 0 and len(predicted) == 6  # other settings
    assert run("--resume", ckpt=other)[0] == 0 and len(predicted) == 6  # another model
    data = (tmp_path / "out" / "c.tif").read_bytes()
    (tmp_path / "out" / "c.tif").write_bytes(data[:len(data) // 2])  # cut short
    assert run("--resume", ckpt=other)[0] == 0 and len(predicted) == 2  # c only


class _LazyStack:
    """A lazy (planes, H, W) array as dask or zarr give napari: shape, dtype, indexing; it
    records what is read and refuses to be read whole."""

    def __init__(self, array):
        self.array, self.shape, self.dtype, self.reads = array, array.shape, array.dtype, []

    def __getitem__(self, idx):
        self.reads.append(idx)
        return self.array[idx]

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole stack was read at once")


def test_predict_array_reads_a_lazy_stack_one_plane_at_a_time():
    from cellseg_plugins.engine.predict import predict_array
    from cellseg_plugins.input_rules import input_rules

    torch.manual_seed(0)
    model = cs.create_model("unet(encoder='plain4')", classes=3).eval()
    predictor = (model, {"in_channels": 1, "norm": {"mean": [0.5], "std": [0.2]}},
                 input_rules(model))
    stack = np.random.default_rng(4).integers(0, 256, (2, 3, 40, 70), dtype=np.uint8)
    lazy = _LazyStack(stack)
    labels = predict_array(predictor, lazy, tile=32, overlap=8)
    assert lazy.reads == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    np.testing.assert_array_equal(labels, predict_array(predictor, stack, tile=32, overlap=8))
    np.testing.assert_array_equal(labels[1, 2], predict_array(predictor, stack[1, 2], tile=32,
                                                              overlap=8))
