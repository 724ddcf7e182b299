"""Training options shared by ``train``, ``cv`` and ``tune`` (one definition each)."""

from __future__ import annotations

from typing import Annotated

import typer



Spec = Annotated[str, typer.Argument(help="model spec, e.g. 'unet+lfa(m=7)'")]
Data = Annotated[str, typer.Option(help="synthetic (built in), sstem, or a folder")]
Classes = Annotated[str | None, typer.Option(help="sstem class map: sstem5 or sstem4")]
ClassMap = Annotated[str | None, typer.Option(help="mask grey levels, e.g. '0:bg,255:cell'")]
Epochs = Annotated[int, typer.Option(help="training epochs")]
BatchSize = Annotated[int, typer.Option(help="crops per batch")]
Lr = Annotated[float, typer.Option(help="learning rate")]
Optimizer = Annotated[str, typer.Option(help="adam or sgd")]
Schedule = Annotated[str, typer.Option(help="none or cosine")]
Loss = Annotated[str, typer.Option(help="ce, focal+iou or dice+ce")]
ClassWeights = Annotated[str, typer.Option(help="none or auto (median frequency)")]
Device = Annotated[str, typer.Option(help="auto, cpu or cuda")]
Amp = Annotated[bool, typer.Option(help="mixed precision")]
Seed = Annotated[int, typer.Option(help="random seed")]
Seeds = Annotated[int, typer.Option(help="seeds per fold (0, 1, ...)")]
Fold = Annotated[int, typer.Option(help="test fold index")]
Folds = Annotated[int, typer.Option(help="number of folds (split by source image)")]
Crop = Annotated[int, typer.Option(help="non-overlapping crop size")]
Augment = Annotated[bool, typer.Option(help="random 90° rotations and flips")]
Workers = Annotated[int, typer.Option(help="data-loader worker processes")]
Out = Annotated[str, typer.Option(help="output folder")]

