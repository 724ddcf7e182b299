"""A complete plugin: Gaussian noise on the bottleneck during training, annealed per epoch."""

from typing import Annotated

import torch
from torch import nn

import cellseg_plugins as cs
from cellseg_plugins.hooks import transform_encoder_features


class BottleneckNoise(cs.PluginModule):
    """x + N(0, std²) in training mode; the identity in eval mode. (N, C, H, W) → same."""

    def __init__(self, std: float, decay: float):
        super().__init__()
        self.std, self.decay = std, decay

    def on_epoch_start(self, epoch: int) -> None:  # per-epoch callback from the training loop
        self.current = self.std * self.decay**epoch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        return x + torch.randn_like(x) * getattr(self, "current", self.std)


@cs.register_plugin("bottleneck_noise", supports=["unet", "fpn", "linknet"])
def bottleneck_noise(model: nn.Module,
                     std: Annotated[float, cs.Range(0, 10)] = 0.1,
                     decay: Annotated[float, cs.Range(0, 1)] = 0.9) -> nn.Module:
    """Add Gaussian noise to the deepest encoder feature while training."""
    transform_encoder_features(model, "bottleneck_noise", {-1: BottleneckNoise(std, decay)})
    return model


if __name__ == "__main__":
    model = cs.create_model("unet(encoder='resnet18')+bottleneck_noise(std=0.5)", classes=3)
    cs.epoch_start(model, 0)
    x = torch.randn(2, 1, 64, 64)
    model.eval()
    assert torch.equal(model(x), model(x))  # eval: deterministic, no noise
    model.train()
    print("train-mode output differs:", not torch.equal(model(x), model(x)))
