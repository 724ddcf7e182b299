"""Data: the synthetic set, folds by source image, the ssTEM protocol and fetch, user folders."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from cellseg_plugins.engine.data import (CropDataset, DataError, fetch_sstem, fold_split,
                                         load_data, load_folder, parse_class_map)
from cellseg_plugins.engine.synthetic import nearest_two, synthetic_dataset, synthetic_image
from conftest import cli


def test_synthetic_data_is_deterministic_and_has_all_classes():
    a, b = synthetic_image(7), synthetic_image(7)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], synthetic_image(8)[0])
    sources = load_data("synthetic")
    counts = sum(np.bincount(m.ravel(), minlength=5) for m in sources.masks)
    assert len(sources.images) == 20 and (counts > 0).all()


def test_nearest_two_matches_a_sort_over_the_centres_ties_included():
    d = np.random.default_rng(0).integers(0, 4, (6, 5, 7)).astype(np.float32)  # many ties
    owner, nearest, second = nearest_two(d)
    order = np.sort(d, axis=0)
    assert np.array_equal(owner, np.argmin(d, axis=0))
    assert np.array_equal(nearest, order[0]) and np.array_equal(second, order[1])
    assert (nearest == second).any()  # the ties were tested


def test_synthetic_data_is_made_once_a_process_and_cannot_be_changed_by_a_caller(monkeypatch):
    import cellseg_plugins.engine.synthetic as synthetic

    a = synthetic_dataset(seed=3)
    assert np.array_equal(a[0][2], synthetic_image(30_002)[0])  # image i has seed 10⁴ seed + i
    monkeypatch.setattr(synthetic, "synthetic_image", None)  # (3) is not made again
    a[0][0][0, 0], a[1][0][0, 0] = -1.0, -1  # the caller's own copies
    b = synthetic_dataset(seed=3)
    assert b[0][0][0, 0] != -1.0 and b[1][0][0, 0] != -1
    assert all(x.flags.writeable for x in b[0] + b[1])  # no warning from torch.from_numpy
    assert all(np.array_equal(x, y) for x, y in zip(a[0][1:] + a[1][1:], b[0][1:] + b[1][1:]))


def test_folds_split_by_source_image():
    split = fold_split(20, 5, 0)
    assert split["test"] == [0, 1, 2, 3] and split["val"] == [4, 5, 6, 7]
    assert split["train"] == list(range(8, 20))
    for k in range(5):
        s = fold_split(20, 5, k)
        assert not set(s["test"]) & set(s["val"]) and not set(s["train"]) & set(s["test"] + s["val"])
    with pytest.raises(DataError, match="--fold 5: expected 0 … 4"):
        fold_split(20, 5, 5)
    assert fold_split(3, 3, 2) == {"train": [1], "val": [0], "test": [2]}
    with pytest.raises(DataError, match=r"--folds 5: 3 source images make at most 3 folds"):
        fold_split(3, 5, 0)
    with pytest.raises(DataError, match=r"2 source image\(s\): folds need at least 3"):
        fold_split(2, 3, 0)


def test_sstem_protocol_192_64_64(tmp_path, sstem_root):
    fetch_sstem(tmp_path, str(sstem_root))
    os.environ["CELLSEG_DATA"] = str(tmp_path)
    try:
        sources = load_data("sstem", "sstem5")
    finally:
        del os.environ["CELLSEG_DATA"]
    split = fold_split(len(sources.images), 5, 0)
    sizes = [len(CropDataset(sources, split[s], 256, [0.5], [0.2])) for s in ("train", "val", "test")]
    assert sizes == [192, 64, 64]
    assert sources.class_names[0] == "membrane" and max(int(m.max()) for m in sources.masks) == 4


def test_fetch_refuses_a_corrupt_copy_and_leaves_nothing(tmp_path, sstem_root):
    bad = tmp_path / "bad"
    shutil.copytree(sstem_root, bad)
    (bad / "stack1" / "raw" / "05.tif").write_bytes(b"corrupt")
    root = tmp_path / "root"
    with pytest.raises(DataError, match="05.tif: SHA-256 mismatch"):
        fetch_sstem(root, str(bad))
    assert not root.exists()
    with pytest.raises(DataError, match="--from '/no/such/dir': no such folder"):
        fetch_sstem(root, "/no/such/dir")
    assert not root.exists()


def test_fetch_keeps_a_verified_copy_and_replaces_a_corrupt_one(tmp_path, sstem_root):
    target = fetch_sstem(tmp_path, str(sstem_root))
    section = target / "stack1" / "raw" / "05.tif"
    good = section.read_bytes()
    assert fetch_sstem(tmp_path, str(sstem_root)) == target and section.read_bytes() == good
    with pytest.raises(DataError, match="--from '/no/such/dir': no such folder"):
        fetch_sstem(tmp_path, "/no/such/dir")  # not 'verified' because a copy is in place
    section.write_bytes(b"corrupt")  # in place, e.g. an interrupted copy by hand
    assert fetch_sstem(tmp_path, str(sstem_root)) == target and section.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sstem"]  # no temporary folder left


def test_fetch_download_code_with_a_file_url(tmp_path, sstem_root):
    target = fetch_sstem(tmp_path, sstem_root.resolve().as_uri())
    assert (target / "stack1" / "raw" / "19.tif").is_file()


def make_folder(root: Path, n=3, size=40, values=(0, 128, 255)):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(root / "images" / f"c{i}.png")
        Image.fromarray(rng.choice(values, (size, size)).astype(np.uint8)).save(root / "masks" / f"c{i}.png")


def test_user_folder_with_class_map(tmp_path):
    make_folder(tmp_path)
    sources = load_folder(tmp_path, "0:background,128:nucleus,255:membrane")
    assert sources.class_names == ("background", "nucleus", "membrane")
    assert {int(v) for m in sources.masks for v in np.unique(m)} == {0, 1, 2}


def test_masks_pair_by_stem_or_a_mask_suffix(tmp_path):
    """c0 ↔ c0, c1 ↔ c1_mask, c2 ↔ c2_gt; nnU-Net's c3_0000 ↔ c3; an exact stem wins;
    nnU-Net's imagesTr / labelsTr folders, folder names in any letter case."""
    make_folder(tmp_path, n=5)
    masks = tmp_path / "masks"
    for old, new in (("c1", "c1_mask"), ("c2", "c2_gt")):
        (masks / f"{old}.png").rename(masks / f"{new}.png")
    (tmp_path / "images" / "c3.png").rename(tmp_path / "images" / "c3_0000.png")
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(masks / "c0_label.png")  # not c0's
    reference = tmp_path / "reference"
    make_folder(reference, n=5)
    got = load_folder(tmp_path, "0:bg,128:a,255:b")
    want = load_folder(reference, "0:bg,128:a,255:b")
    assert got.names == ["c0", "c1", "c2", "c3_0000", "c4"]
    for a, b in zip(got.masks, want.masks):
        np.testing.assert_array_equal(a, b)
    (tmp_path / "images").rename(tmp_path / "imagesTr")  # nnU-Net's folders, any case
    masks.rename(tmp_path / "LABELSTR")
    again = load_folder(tmp_path, "0:bg,128:a,255:b")
    assert again.names == got.names and all(np.array_equal(a, b)
                                            for a, b in zip(again.masks, got.masks))


def test_jpeg_and_bmp_images_train_with_lossless_masks(tmp_path):
    make_folder(tmp_path / "png")
    make_folder(tmp_path / "other")
    images = tmp_path / "other" / "images"
    Image.open(images / "c0.png").save(images / "c0.bmp")
    Image.open(images / "c1.png").save(images / "c1.jpg", quality=100)
    (images / "c0.png").unlink()
    (images / "c1.png").unlink()
    png, other = (load_folder(tmp_path / name, "0:bg,128:a,255:b") for name in ("png", "other"))
    assert other.names == ["c0", "c1", "c2"]
    np.testing.assert_array_equal(other.images[0], png.images[0])  # BMP: lossless
    assert np.abs(other.images[1] - png.images[1]).mean() < 0.05  # JPEG: close
    for a, b in zip(other.masks, png.masks):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype, options", [
    (np.uint8, {"compression": "lzw"}),  # Photoshop's, many microscopes' exports
    (np.uint16, {"compression": "lzw", "predictor": True}),
    (np.uint16, {"compression": "zstd"}),
    (np.uint8, {"compression": "packbits"}),
], ids=["lzw", "lzw_predictor_16bit", "zstd", "packbits"])
def test_compressed_tiff_stacks_read_as_the_uncompressed(tmp_path, dtype, options):
    """TIFFs compressed with codecs tifffile takes from imagecodecs (a dependency: without it
    an LZW stack was 'unreadable image (ValueError)', no reason given) read as the same
    pixels, whole and page by page."""
    from cellseg_plugins.engine.image_files import read_image, read_planes

    stack = np.random.default_rng(0).integers(0, np.iinfo(dtype).max, (3, 40, 50), dtype)
    tifffile.imwrite(tmp_path / "s.tif", stack, photometric="minisblack", **options)
    with tifffile.TiffFile(tmp_path / "s.tif") as f:
        assert f.pages[0].compression != 1  # really compressed
    np.testing.assert_array_equal(read_image(tmp_path / "s.tif"), stack)
    np.testing.assert_array_equal(np.stack(list(read_planes(tmp_path / "s.tif"))), stack)


def test_user_folder_tiff_stack(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "labels").mkdir()
    tifffile.imwrite(tmp_path / "raw" / "s.tif", np.zeros((3, 32, 32), np.uint16), photometric="minisblack")
    tifffile.imwrite(tmp_path / "labels" / "s.tif", np.ones((3, 32, 32), np.uint8), photometric="minisblack")
    sources = load_folder(tmp_path)
    assert len(sources.images) == 3 and sources.class_names == ("class0", "class1")


@pytest.mark.parametrize("breakage, fragment", [
    ("missing_mask", "c1.png: no mask named 'c1' in "),
    ("size", "differs from mask size"),
    ("unreadable", "c2.png: unreadable image (UnidentifiedImageError: cannot identify image "),
    ("unmapped", "mask value 255 is not in the class map"),
    ("grey", "masks: mask values 0, 128, 255 would make 256 classes, 253 of them empty; map "
             "them with --class-map, e.g. '0:class0,128:class1,255:class2'"),
    ("probabilities", "c0.tif: mask value 0.5 is not an integer"),
    ("negative", "c0.tif: mask value -1 is negative"),
    ("colour", "c1.png: a colour-coded mask (pixel (3, 7) is (255, 0, 0)); masks hold one "
               "class index or grey level per pixel"),
    ("nan", "c1.tif: 2 pixel(s) are NaN or infinite (the first at (4, 9): nan)"),
    ("jpeg_mask", "c1.jpg: a JPEG mask (JPEG's compression blurs class values into each "
                  "other); save masks as PNG or TIFF"),
    ("instances", "masks: 400 classes, more than the 255 a label image holds; one value per "
                  "object is an instance mask"),
])
def test_bad_user_data_gives_one_line_errors(tmp_path, breakage, fragment):
    make_folder(tmp_path)
    class_map = "0:bg,128:a,255:b"
    if breakage == "missing_mask":
        (tmp_path / "masks" / "c1.png").unlink()
    elif breakage == "size":
        Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "masks" / "c0.png")
    elif breakage == "unreadable":
        (tmp_path / "images" / "c2.png").write_bytes(b"not a png")
    elif breakage == "unmapped":
        class_map = "0:bg,128:a"
    elif breakage == "nan":  # a float image with holes: min/max scaling would be all NaN
        image = np.random.default_rng(0).random((40, 40)).astype(np.float32)
        image[4, 9], image[30, 2] = np.nan, np.inf
        (tmp_path / "images" / "c1.png").unlink()
        tifffile.imwrite(tmp_path / "images" / "c1.tif", image)
    elif breakage == "jpeg_mask":
        mask = tmp_path / "masks" / "c1.png"
        Image.open(mask).save(tmp_path / "masks" / "c1.jpg")
        mask.unlink()
    elif breakage == "instances":  # a uint16 label image of 400 objects, 0 … 399
        class_map = None
        for i in range(3):
            ids = np.arange(40 * 40, dtype=np.uint16).reshape(40, 40) % 400
            tifffile.imwrite(tmp_path / "masks" / f"c{i}.tif", ids)
            (tmp_path / "masks" / f"c{i}.png").unlink()
    elif breakage == "colour":  # red for one class, black for another: R alone would do
        mask = np.zeros((40, 40, 3), np.uint8)
        mask[3, 7] = (255, 0, 0)
        Image.fromarray(mask).save(tmp_path / "masks" / "c1.png")
    else:  # masks without a class map: grey levels, or values that are no class index
        class_map = None
        if breakage != "grey":
            (tmp_path / "masks" / "c0.png").unlink()
            mask = np.zeros((40, 40), np.float32 if breakage == "probabilities" else np.int8)
            mask[5, 5] = 0.5 if breakage == "probabilities" else -1
            tifffile.imwrite(tmp_path / "masks" / "c0.tif", mask)
    with pytest.raises(DataError) as err:
        load_folder(tmp_path, class_map)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_grey_masks_saved_as_rgb_and_hidden_files(tmp_path):
    """A grey mask saved as RGB(A) is the grey mask; hidden files (macOS' ._c0.png) are not
    images, in training folders as in predict's."""
    make_folder(tmp_path / "grey")
    make_folder(tmp_path / "rgb")
    for i in range(3):
        grey = np.asarray(Image.open(tmp_path / "rgb" / "masks" / f"c{i}.png"))
        alpha = np.full_like(grey, 255)
        Image.fromarray(np.stack([grey, grey, grey, alpha], -1)).save(
            tmp_path / "rgb" / "masks" / f"c{i}.png")
    (tmp_path / "rgb" / "images" / "._c0.png").write_bytes(b"\0\5\x16\7 AppleDouble")
    (tmp_path / "rgb" / "masks" / ".c9.png").write_bytes(b"")
    grey, rgb = (load_folder(tmp_path / name, "0:bg,128:a,255:b") for name in ("grey", "rgb"))
    assert rgb.names == grey.names == ["c0", "c1", "c2"]
    for a, b in zip(grey.masks, rgb.masks):
        np.testing.assert_array_equal(a, b)
    from cellseg_plugins.engine.predict import input_paths

    assert [p.name for p in input_paths([str(tmp_path / "rgb" / "images")])] == [
        "c0.png", "c1.png", "c2.png"]


def test_alpha_palette_and_mixed_grey_and_colour_folders(tmp_path):
    """Grey with alpha (LA PNG) is grey, image and mask alike, not a stack of 2-pixel-wide
    pages; a palette mask holds its indices; a folder of grey and colour images trains on
    colour, each grey image repeated into RGB."""
    make_folder(tmp_path / "grey")
    make_folder(tmp_path / "mixed")
    images, masks = tmp_path / "mixed" / "images", tmp_path / "mixed" / "masks"
    first = np.asarray(Image.open(images / "c0.png"))
    mask = np.asarray(Image.open(masks / "c0.png"))
    Image.fromarray(np.dstack([first, first // 3]), mode="LA").save(images / "c0.png")
    Image.fromarray(np.dstack([mask, mask // 2]), mode="LA").save(masks / "c0.png")
    indices = (np.asarray(Image.open(masks / "c1.png")) > 0).astype(np.uint8)
    palette = Image.fromarray(indices, mode="P")
    palette.putpalette([0, 0, 0, 200, 10, 10])
    palette.save(masks / "c1.png")
    second = np.asarray(Image.open(images / "c1.png"))
    colour = np.dstack([second, second // 2, 255 - second])
    Image.fromarray(colour).save(images / "c1.png")
    grey = load_folder(tmp_path / "grey", "0:bg,128:a,255:b")
    mixed = load_folder(tmp_path / "mixed", "0:bg,1:a,128:a,255:b")
    assert mixed.names == ["c0", "c1", "c2"] and mixed.in_channels == 3
    assert all(im.shape == (40, 40, 3) for im in mixed.images)
    for k in (0, 2):  # grey (c0 had alpha): the grey image in each of the three channels
        for c in range(3):
            np.testing.assert_array_equal(mixed.images[k][..., c], grey.images[k])
    np.testing.assert_allclose(mixed.images[1], colour / 255.0, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(mixed.masks[0], grey.masks[0])
    np.testing.assert_array_equal(mixed.masks[1], (grey.masks[1] > 0).astype(np.int64))


def test_a_crop_larger_than_an_image_of_any_split_is_one_line_before_training(tmp_path,
                                                                             capsys):
    """The test split is checked too (it was found only when cv tested the trained model)."""
    from conftest import cli

    make_folder(tmp_path / "data", n=5, size=96)
    Image.fromarray(np.zeros((48, 80), np.uint8)).save(tmp_path / "data" / "images" / "c0.png")
    Image.fromarray(np.zeros((48, 80), np.uint8)).save(tmp_path / "data" / "masks" / "c0.png")
    code, _, err = cli(capsys, "train", "unet(encoder='plain4')", "--data", tmp_path / "data",
                       "--class-map", "0:bg,128:a,255:b", "--crop", "64", "--fold", "0",
                       "--out", tmp_path / "run")
    assert code == 2 and err == ("error: --crop 64: image c0 is 48×80; pass a --crop of at "
                                 "most 48, the smallest side of these images\n"), err
    assert not (tmp_path / "run").exists()


def test_class_map_syntax_error():
    with pytest.raises(DataError, match="expected VALUE:NAME"):
        parse_class_map("0:bg,x")


def test_data_info(capsys):
    code, out, _ = cli(capsys, "data", "info", "synthetic")
    assert code == 0 and "20 images" in out and "intracellular" in out
