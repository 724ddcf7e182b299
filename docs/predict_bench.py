"""Tiled prediction of one image with PyTorch and with ONNX Runtime: seconds and agreement.

    python docs/predict_bench.py CHECKPOINT IMAGE [--tile 256] [--overlap 32] [--repeats 3]

The checkpoint is exported to ONNX first (``cellseg export``'s checks); both runtimes then
label the image as ``cellseg predict`` does (one warm-up, then the median of the repeats, on
the CPU: torch with its thread count, ONNX Runtime with its default, one per core). Prints one JSON object: the seconds of each runtime, their
ratio (onnx / torch) and the fraction of pixels whose labels agree (target ≥ 0.999).
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cellseg_plugins.engine.image_files import read_image
from cellseg_plugins.engine.export import export_checkpoint
from cellseg_plugins.engine.predict import load_predictor, predict_array


def timed(predictor, image, tile, overlap, repeats):
    predict_array(predictor, image, tile=tile, overlap=overlap)  # warm-up
    seconds, labels = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        labels = predict_array(predictor, image, tile=tile, overlap=overlap)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), labels


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("image")
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--overlap", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    image = read_image(Path(args.image))
    torch_predictor = load_predictor(args.checkpoint, "torch")
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_checkpoint(args.checkpoint, "onnx", Path(tmp) / "model.onnx")
        onnx_predictor = load_predictor(onnx_path, "onnx")  # the session holds the model
    t_torch, a = timed(torch_predictor, image, args.tile, args.overlap, args.repeats)
    t_onnx, b = timed(onnx_predictor, image, args.tile, args.overlap, args.repeats)
    print(json.dumps({"image": args.image, "shape": list(image.shape), "tile": args.tile,
                      "overlap": args.overlap, "threads": torch.get_num_threads(),
                      "torch_s": round(t_torch, 3), "onnx_s": round(t_onnx, 3),
                      "onnx_over_torch": round(t_onnx / t_torch, 3),
                      "agreement": float((a == b).mean())}))


if __name__ == "__main__":
    main()
