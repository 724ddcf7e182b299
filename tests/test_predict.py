"""Tiled prediction: any image size, tiles blend to the untiled prediction."""

import numpy as np
import pytest
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
