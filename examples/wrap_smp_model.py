"""Bolt cellseg plugins onto a model built with segmentation_models_pytorch directly."""

import segmentation_models_pytorch as smp
import torch

import cellseg_plugins as cs

model = smp.FPN(encoder_name="resnet18", encoder_weights=None, in_channels=1, classes=5)
model = cs.apply_plugins(model, "scse(reduction=8)")

x = torch.randn(2, 1, 128, 128)
print("output:", tuple(model(x).shape))
print("plugin parameters:", sum(p.numel() for n, p in model.named_parameters() if "scse" in n))
