"""Peak memory of tiled prediction on one large image: what predict_array (the Python API and
the napari widget; ``cellseg predict`` runs the same per page) adds to the process; with
``--pages N``, what predict_paths (``cellseg predict``) adds for a TIFF stack of N such pages
(a page each, or with ``--one-page`` all in one page, as ImageJ writes files over 4 GB).

    python docs/predict_memory.py [--size 4096] [--dtype uint8] [--classes 5] [--tile 512]
                                  [--overlap 32] [--pages N [--one-page]]

An untrained ``unet(encoder='plain4')`` labels a random SIZE² image of pixel type DTYPE
(uint8 as electron micrographs are stored, or float32; the labels do not matter: the buffers
do); with ``--pages``, its checkpoint labels an N-page stack of them, written to a temporary
folder first (label TIFF included, deleted after). Prints one JSON object: the image's (or
stack's) megabytes, peak RSS before and after labelling it (MB; ``ru_maxrss``), their
difference and the seconds it took.
"""

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

import cellseg_plugins as cs
from cellseg_plugins.engine.checkpoint import FORMAT
from cellseg_plugins.engine.predict import predict_array, predict_paths
from cellseg_plugins.input_rules import input_rules


def peak_mb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # Linux: kilobytes


def main() -> None:
    parser = argparse.ArgumentParser()
    for name, default in (("size", 4096), ("classes", 5), ("tile", 512), ("overlap", 32)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--dtype", choices=["uint8", "float32"], default="uint8")
    parser.add_argument("--pages", type=int, default=0)
    parser.add_argument("--one-page", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = cs.create_model("unet(encoder='plain4')", classes=args.classes).eval()
    predictor = (model, {"in_channels": 1, "norm": {"mean": [0.5], "std": [0.2]}},
                 input_rules(model))
    rng = np.random.default_rng(0)
    image = (rng.integers(0, 256, (args.size, args.size), dtype=np.uint8)
             if args.dtype == "uint8" else rng.random((args.size, args.size), dtype=np.float32))
    predict_array(predictor, image[:64, :64], tile=64, overlap=0)  # warm-up
    if args.pages:
        with tempfile.TemporaryDirectory() as tmp:
            stack, ckpt = Path(tmp) / "stack.tif", Path(tmp) / "model.pt"
            with tifffile.TiffWriter(stack, imagej=args.one_page) as tif:  # never whole
                tif.write((image for _ in range(args.pages)), photometric="minisblack",
                          shape=(args.pages, *image.shape), dtype=image.dtype,
                          truncate=args.one_page)
            torch.save({"format": FORMAT, "spec": model.cellseg_spec, "in_channels": 1,
                        "class_names": [f"c{i}" for i in range(args.classes)],
                        "norm": predictor[1]["norm"], "model": model.state_dict(),
                        "config": {"data": "synthetic"}}, ckpt)
            before, start = peak_mb(), time.perf_counter()
            predict_paths(ckpt, [str(stack)], Path(tmp) / "out", args.tile, args.overlap)
            seconds, after = time.perf_counter() - start, peak_mb()
        image_mb = args.pages * image.nbytes // 2**20
    else:
        before, start = peak_mb(), time.perf_counter()
        predict_array(predictor, image, tile=args.tile, overlap=args.overlap)
        seconds, after = time.perf_counter() - start, peak_mb()
        image_mb = image.nbytes // 2**20
    print(json.dumps({"image_mb": image_mb, "peak_rss_before_mb": before,
                      "peak_rss_after_mb": after, "added_mb": after - before,
                      "seconds": round(seconds, 2), "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
