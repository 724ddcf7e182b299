"""Every plugin's CUDA path against its CPU path: same weights, same input, fp32, eval mode.

    python docs/gpu_check.py [--size 128] [--arch "classic_unet(width=8)"]

Prints one JSON object per plugin: the largest |CUDA − CPU| of the logits (fp32, TF32 off),
whether the bf16-autocast forward is finite, and the fp32 step time on each device. This
checks the kernels the CPU suite cannot reach (SDPA's fused CUDA attention, cuDNN convolutions).
First, one JSON object for the device-resident data path: an epoch's augmented batches cut
on CUDA against the same epoch cut on the CPU (they must be identical); then, per spec, the
times a training epoch and a validation of the engine made the host wait for the GPU
(``torch.cuda.set_sync_debug_mode``: expected a few per epoch, at its end, none per step);
then test-time augmentation's averaged probabilities on CUDA against the CPU.
"""

import argparse
import json
import time

import torch

import cellseg_plugins as cs

SMALL = {"lfa": "(m=7)", "frem": "(B=0.015625,X=250)"}


def timed(model, x, repeats=5):
    with torch.no_grad():
        model(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            out = model(x)
        if x.is_cuda:
            torch.cuda.synchronize()
    return out, (time.perf_counter() - start) / repeats


def check_device_crops():
    """An augmented, shuffled epoch of device-resident batches: CUDA against CPU, exactly."""
    from cellseg_plugins.engine.data import CropDataset, load_data
    from cellseg_plugins.engine.device_data import DeviceCrops

    sources = load_data("synthetic")
    dataset = CropDataset(sources, list(range(len(sources.images))), 64, [0.5], [0.2],
                          augment=True, seed=1)
    epochs = [[torch.cat(t) for t in zip(*DeviceCrops(dataset, torch.device(d)).batches(
        8, epoch=3, shuffle=True))] for d in ("cpu", "cuda")]
    (cx, cy), (gx, gy) = epochs
    print(json.dumps({"check": "device_crops", "crops": len(cx),
                      "images_equal": torch.equal(cx, gx.cpu()),
                      "masks_equal": torch.equal(cy, gy.cpu())}), flush=True)


def check_host_waits(spec: str):
    """Synchronising CUDA calls in one engine training epoch and one validation, after a
    warm-up epoch (the CPU suite counts the reads that cause them; this counts the waits)."""
    import tempfile
    import warnings

    from cellseg_plugins.engine.config import TrainConfig
    from cellseg_plugins.engine.train import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(TrainConfig(spec=spec, epochs=2, crop=64, batch_size=8, device="cuda",
                                      out=f"{tmp}/run"))
        trainer.write_config()
        trainer.train_epoch()
        trainer.validate()
        counts = {}
        for part, call in (("train_epoch", trainer.train_epoch), ("validate", trainer.validate)):
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    call()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            counts[part] = sum("synchroniz" in str(w.message) for w in caught)
        steps = -(-len(trainer.train_crops) // 8)
        print(json.dumps({"check": "host_waits", "spec": spec, "steps": steps, **counts}),
              flush=True)


def check_tta(arch: str, x: torch.Tensor):
    """Test-time augmentation (d4: 8 flipped and turned passes) on CUDA against the CPU."""
    from cellseg_plugins.engine.tta import averaged_probabilities

    torch.manual_seed(0)
    model = cs.create_model(arch, classes=5).eval()
    with torch.no_grad():
        cpu = averaged_probabilities(model, x, "d4")
        gpu = averaged_probabilities(model.cuda(), x.cuda(), "d4").cpu()
    print(json.dumps({"check": "tta_d4", "spec": arch,
                      "max_abs_diff": float((gpu - cpu).abs().max())}), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--arch", default="classic_unet(width=8)")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    check_device_crops()
    for spec in ("classic_unet(width=8)", "classic_unet(width=8)+feedback_convlstm",
                 "classic_unet(width=8,se=True)+bottleneck_supervision"):
        check_host_waits(spec)
    x = torch.randn(2, 1, args.size, args.size)
    check_tta(args.arch, x)
    for name in ["", *cs.list_plugins()]:
        spec = args.arch + (f"+{name}{SMALL.get(name, '')}" if name else "")
        torch.manual_seed(0)
        model = cs.create_model(spec, classes=5)
        model.train()
        with torch.no_grad():
            model(x)  # BatchNorm statistics that are not 0/1
        model.eval()
        cpu, cpu_s = timed(model, x)
        model.cuda()
        gpu, gpu_s = timed(model, x.cuda())
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            finite = bool(torch.isfinite(model(x.cuda())).all())
        print(json.dumps({"spec": spec, "max_abs_diff": float((gpu.cpu() - cpu).abs().max()),
                          "logit_scale": float(cpu.abs().max()), "bf16_finite": finite,
                          "cpu_s": round(cpu_s, 4), "cuda_s": round(gpu_s, 5)}), flush=True)


if __name__ == "__main__":
    main()
