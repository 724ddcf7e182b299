"""``cellseg list``: registered architectures, plugins and encoders."""

from __future__ import annotations

import fnmatch
import json
import sys
from enum import Enum
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table


class Kind(str, Enum):
    arch = "arch"
    plugin = "plugin"
    encoder = "encoder"


def encoder_rows() -> list[dict]:
    """smp's encoder table (plain encoders included) as list entries."""
    from segmentation_models_pytorch.encoders import encoders

    rows = []
    for name, spec in sorted(encoders.items()):
        weights = sorted(spec.get("pretrained_settings", {}))
        desc = f"{spec['encoder'].__name__}; pretrained: {', '.join(weights) or 'none'}"
        rows.append({"name": name, "kind": "encoder", "description": desc, "params": []})
    rows.append({"name": "tu-*", "kind": "encoder", "params": [],
                 "description": "any timm model with features_only support, e.g. tu-resnet18"})
    return rows


def registry_rows() -> tuple[list[dict], dict[str, str]]:
    """Every registered arch and plugin as list entries, and the third-party packages that
    failed to load (loading the registry imports torch, smp and timm)."""
    from ..registry import all_entries, third_party_errors

    return [e.to_json() for e in all_entries()], third_party_errors()


def collect(pattern: str, kind: Kind | None) -> tuple[dict[str, dict], dict[str, str]]:
    """The entries matching ``pattern`` (and ``kind``), and third-party load errors. A
    pattern without wildcards matches names that contain it ('feedback': feedback_self, …)."""
    from .list_cache import cached_listing

    rows, errors = [], {}
    if kind in (None, Kind.arch, Kind.plugin):
        entries, errors = cached_listing(registry_rows)
        rows += [r for r in entries if kind is None or r["kind"] == kind.value]
    if kind is Kind.encoder:
        rows += encoder_rows()
    glob = pattern.lower() if any(c in pattern for c in "*?[") else f"*{pattern.lower()}*"
    return {r["name"]: r for r in rows if fnmatch.fnmatch(r["name"], glob)}, errors


def format_param(p: dict) -> str:
    from ..registry.spec import format_value

    text = f"{p['name']}: {p['type']}"
    if not p["required"]:
        default = p["default"]
        text += f" = {format_value(tuple(default) if isinstance(default, list) else default)}"
    if "range" in p:
        lo, hi = p["range"]
        bracket = "(" if p.get("range_lo_open") else "["
        text += f" in {bracket}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
    return text


def list_command(
    pattern: Annotated[str, typer.Argument(
        help="a name's part ('feedback') or a shell pattern ('*net', 'plain?')")] = "*",
    kind: Annotated[Kind | None, typer.Option("--kind", help="only this kind")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON document")] = False,
) -> None:
    """List architectures, plugins (and with --kind encoder, encoders) with their parameters."""
    rows, errors = collect(pattern, kind)
    for package, reason in errors.items():
        print(f"warning: plugin package {package!r} failed to load ({reason}); skipped",
              file=sys.stderr)
    if not rows:
        print(f"nothing matches {pattern!r}" + ("" if kind else
              " (encoders are listed with --kind encoder)"), file=sys.stderr)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        return
    table = Table(title=f"cellseg registry ({len(rows)} matching {pattern!r})", show_lines=True)
    for col in ("name", "kind", "parameters", "description", "supports / input"):
        table.add_column(col, overflow="fold")
    for r in rows.values():
        supports = r.get("supports", "")
        if isinstance(supports, list):
            supports = ", ".join(supports)
        if "input" in r:
            supports = f"input: {r['input']}"
        table.add_row(r["name"], r["kind"], "\n".join(format_param(p) for p in r["params"]),
                      r["description"], supports)
    Console().print(table)
