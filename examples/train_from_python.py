"""Train, evaluate and predict from Python with the same engine the CLI uses."""

import sys
import tempfile
from pathlib import Path

from cellseg_plugins.engine.evaluation import evaluate_checkpoint
from cellseg_plugins.engine.train import TrainConfig, Trainer

out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()) / "run"
config = TrainConfig(
    spec="unet(encoder='plain4')+frem(B=4,X=250)",  # the tiny classic U-Net with FREM
    data="synthetic", epochs=2, crop=64, batch_size=32, device="cpu", out=str(out),
)
trainer = Trainer(config)
trainer.run(on_epoch=lambda row: print(f"epoch {row['epoch']}: val mIoU {row['val_miou']:.3f}"))
result = evaluate_checkpoint(out / "best.pt", split="test", device="cpu")
print(f"test mIoU {result['miou']:.3f}; files: {sorted(p.name for p in out.iterdir())}")
