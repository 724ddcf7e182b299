"""Peak memory of tiled prediction on one large image: what predict_array (the Python API and
the napari widget; ``cellseg predict`` runs the same per page) adds to the process.

    python docs/predict_memory.py [--size 4096] [--dtype uint8] [--classes 5] [--tile 512]
                                  [--overlap 32]

An untrained ``unet(encoder='plain4')`` labels a random SIZE² image of pixel type DTYPE
(uint8 as electron micrographs are stored, or float32; the labels do not matter: the buffers
do). Prints one JSON object: the image's megabytes, peak RSS before and after labelling it
(MB; ``ru_maxrss``), their difference and the seconds it took.
"""

import argparse
import json
import resource
import time

import numpy as np
import torch

import cellseg_plugins as cs
from cellseg_plugins.engine.predict import predict_array
from cellseg_plugins.input_rules import input_rules


def peak_mb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # Linux: kilobytes


def main() -> None:
    parser = argparse.ArgumentParser()
    for name, default in (("size", 4096), ("classes", 5), ("tile", 512), ("overlap", 32)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--dtype", choices=["uint8", "float32"], default="uint8")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = cs.create_model("unet(encoder='plain4')", classes=args.classes).eval()
    predictor = (model, {"in_channels": 1, "norm": {"mean": [0.5], "std": [0.2]}},
                 input_rules(model))
    rng = np.random.default_rng(0)
    image = (rng.integers(0, 256, (args.size, args.size), dtype=np.uint8)
             if args.dtype == "uint8" else rng.random((args.size, args.size), dtype=np.float32))
    predict_array(predictor, image[:64, :64], tile=64, overlap=0)  # warm-up
    before, start = peak_mb(), time.perf_counter()
    predict_array(predictor, image, tile=args.tile, overlap=args.overlap)
    seconds, after = time.perf_counter() - start, peak_mb()
    print(json.dumps({"image_mb": image.nbytes // 2**20, "peak_rss_before_mb": before,
                      "peak_rss_after_mb": after, "added_mb": after - before,
                      "seconds": round(seconds, 2), "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
