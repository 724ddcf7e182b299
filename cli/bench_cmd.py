"""``cellseg bench``: time and memory of a model, optionally against another."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from ..engine.config import TrainConfig
from .errors import CLIError


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise CLIError(f"{name} {value}: must be at least 1")


def bench_command(
    spec: Annotated[str, typer.Argument(help="model spec, e.g. 'unet+lfa(m=7)'")],
    vs: Annotated[str | None, typer.Option(help="a second spec to compare against")] = None,
    size: Annotated[int, typer.Option(help="input height and width")] = 256,
    batch: Annotated[int, typer.Option(help="batch size")] = 4,
    in_channels: Annotated[int, typer.Option(help="input channels")] = 1,
    classes: Annotated[int, typer.Option(help="output classes")] = 5,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    steps: Annotated[int, typer.Option(help="timed steps per phase (after 2 warm-up steps)")] = 10,
    epoch: Annotated[bool, typer.Option(
        "--epoch", help="time training epochs of the engine against a bare PyTorch loop")] = False,
    data: Annotated[str, typer.Option(help="--epoch: synthetic, sstem or a folder")] = "synthetic",
    class_map: Annotated[str | None, typer.Option(
        help="--epoch, a folder's masks: grey levels to classes, e.g. '0:bg,255:cell'")] = None,
    epochs: Annotated[int, typer.Option(help="--epoch: timed epochs (after 1 warm-up)")] = 3,
    precision: Annotated[str, typer.Option(
        help="auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16 or fp16")] = "auto",
    channels_last: Annotated[bool, typer.Option(
        "--channels-last/--no-channels-last",
        help="channels-last memory format, as train uses by default")] = True,
    data_on_device: Annotated[bool | None, typer.Option(
        "--data-on-device/--no-data-on-device",
        help="--epoch: the engine's device-resident data (default: when it fits)")] = None,
    compile: Annotated[bool, typer.Option(
        "--compile", help="--epoch: torch.compile the engine's and the bare loop's model")
    ] = False,
    compile_mode: Annotated[str, typer.Option(
        help="--epoch, with --compile: default, reduce-overhead or max-autotune")] = "default",
    threads: Annotated[int | None, typer.Option(
        help="CPU threads for the timed models (default: torch's, one per core)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Time a training step and an eval forward; report their FLOPs, peak memory and parameters.

    With --epoch: time whole training epochs (validation and checkpoints included)
    of the engine against a bare PyTorch loop over the same model, crops, batch and optimiser."""
    from ..engine.bench import BenchConfig, report, run_bench
    from ..engine.train import emulation_note, resolve_device, resolve_precision
    from ..input_rules import input_rules
    from ..registry import create_model, parse_spec

    for name, value in (("--size", size), ("--batch", batch), ("--in-channels", in_channels),
                        ("--classes", classes), ("--steps", steps), ("--epochs", epochs),
                        ("--threads", 1 if threads is None else threads)):
        _positive(name, value)
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise CLIError(f"--precision {precision!r}: expected auto, fp32, bf16 or fp16")
    step_only = {f"--vs {vs}": vs is not None, f"--steps {steps}": steps != 10,
                 f"--in-channels {in_channels}": in_channels != 1,
                 f"--classes {classes}": classes != 5}
    epoch_only = {f"--data {data}": data != "synthetic", f"--epochs {epochs}": epochs != 3,
                  f"--class-map {class_map}": class_map is not None,
                  "--data-on-device/--no-data-on-device": data_on_device is not None,
                  "--compile": compile, f"--compile-mode {compile_mode}": compile_mode != "default"}
    for flag, given in (step_only if epoch else epoch_only).items():
        if given and epoch:
            raise CLIError(f"{flag}: only without --epoch (--epoch times one model on the "
                           "data's channels and classes)")
        if given:
            raise CLIError(f"{flag}: only with --epoch" + (
                " (the step benchmark times eager models)" if "compile" in flag else ""))
    note = emulation_note(device, precision)
    if note:
        Console(stderr=True).print(note)
    if epoch:
        if threads:
            import torch

            torch.set_num_threads(threads)
        _epoch_bench(TrainConfig(spec=spec, data=data, class_map=class_map, crop=size,
                                 batch_size=batch,
                                 device=device, precision=precision,
                                 channels_last=channels_last,
                                 data_on_device=data_on_device, compile=compile,
                                 compile_mode=compile_mode), epochs, as_json)
        return
    dev = resolve_device(device)
    specs = [str(parse_spec(spec))] + ([str(parse_spec(vs))] if vs else [])
    for s in specs:  # build once here: plugin and size errors before any worker starts
        rules = input_rules(create_model(s, in_channels=in_channels, classes=classes))
        try:
            rules.check(size, f"--size {size}")
        except ValueError as e:
            raise CLIError(f"{e} ({s})") from None
    cfg = BenchConfig(size, batch, in_channels, classes, dev.type, steps,
                      resolve_precision(precision, dev), channels_last, threads)
    if as_json:
        results = run_bench(specs, cfg)
        print(json.dumps(report(results, cfg), indent=2))
        return
    with Progress(transient=True) as progress:
        task = progress.add_task("benchmark", total=2 * (steps + 2))
        results = run_bench(specs, cfg, progress=lambda *_: progress.advance(task))
    show(report(results, cfg))


def show(rep: dict) -> None:
    layout = "channels-last" if rep["channels_last"] else "NCHW"
    table = Table(title=f"cellseg bench ({rep['device']}, {rep['precision']}, {layout}, "
                        f"{rep['batch']}×{rep['in_channels']}×{rep['size']}², "
                        f"{rep['steps']} steps)")
    for col in ("spec", "train step (s)", "eval forward (s)", "train GFLOP", "peak memory (MiB)",
                "params"):
        table.add_column(col)
    rows = [rep] + ([rep["vs"]] if "vs" in rep else [])
    for r in rows:
        table.add_row(r["spec"], _time(r["train_time"]), _time(r["eval_time"]),
                      f"{r['train_flops'] / 1e9:.1f}", f"{r['peak_memory'] / 2**20:.0f}",
                      f"{r['params']:,}")
    if "ratio" in rep:
        q = rep["ratio"]
        table.add_row("ratio", f"{q['train_time']:.3f}×", f"{q['eval_time']:.3f}×",
                      f"{q['train_flops']:.3f}×", f"{q['peak_memory']:.3f}×",
                      f"{q['params']:.3f}×")
    Console().print(table)


def _time(t: dict) -> str:
    return f"{t['median']:.4f} ± {t['spread'] / 2:.4f}"


def _epoch_bench(cfg: TrainConfig, epochs: int, as_json: bool) -> None:
    from ..engine.epoch_bench import run_epoch_bench

    if as_json:
        print(json.dumps(run_epoch_bench(cfg, epochs), indent=2))
        return
    with Progress(transient=True) as progress:
        task = progress.add_task("epochs", total=epochs + 1)
        rep = run_epoch_bench(cfg, epochs, progress=lambda *_: progress.advance(task))
    table = Table(title=f"cellseg bench --epoch ({rep['device']}, {rep['data']}, "
                        f"{rep['train_crops']}+{rep['val_crops']} crops of {rep['crop']}², batch "
                        f"{rep['batch_size']}, {rep['precision']}, engine "
                        f"{'channels-last' if rep['channels_last'] else 'NCHW'}, data on "
                        f"device: {rep['data_on_device']})")
    for col in ("loop", "epoch (s, median)", "images/s"):
        table.add_column(col)
    table.add_row("engine", f"{rep['engine_epoch_s']:.2f}", f"{rep['engine_images_per_s']:.1f}")
    table.add_row("bare", f"{rep['bare_epoch_s']:.2f}", f"{rep['bare_images_per_s']:.1f}")
    table.add_row("ratio", f"{rep['ratio']:.3f}×", "")
    table.add_row("engine files", f"{rep['engine_files_s']:.2f}", "")
    Console().print(table)
