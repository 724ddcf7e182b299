"""The registry's listing, cached on disk so that ``cellseg list`` needs no torch.

Building the listing imports torch, smp and timm (about 5 s on 2 cores) only to read names,
parameters and docstrings. A fresh ``cellseg`` process therefore reads the listing from
``<cache dir>/registry-<key>.json``, where the key hashes everything the listing depends on:
the Python, cellseg, torch, smp and timm versions, the size and mtime of every source file of
cellseg, and each third-party package of the ``cellseg.plugins`` entry-point group (its
entry point, version and source files). Any change gives a new key and the listing is built
again. Cache dir: ``$CELLSEG_CACHE_DIR``, else ``$XDG_CACHE_HOME/cellseg/listing``, else
``~/.cache/cellseg/listing``; one that cannot be written only costs the speed.

A process that has imported torch already (a Python session, the tests) may have registered
names at run time, so it neither reads nor writes the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Callable

DEPENDENCIES = ("torch", "segmentation_models_pytorch", "timm")
KEEP = 8  # listings kept in the cache dir, newest first


def cache_dir() -> Path:
    if os.environ.get("CELLSEG_CACHE_DIR"):
        return Path(os.environ["CELLSEG_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cellseg" / "listing"


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "-"


def _sources(module: str) -> list[str]:
    """'path size mtime' of the .py files of a module or package, found without importing it
    (a dotted name imports its parent package only)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return [f"{module} missing"]
    if spec is None:
        return [f"{module} missing"]
    roots = [Path(p) for p in (spec.submodule_search_locations or [])]
    files = [f for r in roots for f in r.rglob("*.py")] if roots else [Path(spec.origin or "")]
    out = []
    for f in sorted(files):
        try:
            st = f.stat()
            out.append(f"{f} {st.st_size} {st.st_mtime_ns}")
        except OSError:
            out.append(f"{f} missing")
    return out


def cache_key() -> str:
    """A hash of what the listing depends on (see the module docstring)."""
    from importlib.metadata import entry_points

    from ..registry.registry import ENTRY_POINT_GROUP

    parts = [sys.version, *(f"{d} {_version(d)}" for d in ("cellseg", *DEPENDENCIES))]
    for sub in ("cellseg_plugins", "cellseg_plugins.registry", "cellseg_plugins.cli"):
        parts += _sources(sub)
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.name, e.value)):
        dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else "-"
        parts += [f"{ep.name} {ep.value} {dist}", *_sources(ep.value.split(":")[0].split(".")[0])]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def cached_listing(build: Callable[[], tuple[list[dict], dict[str, str]]]
                   ) -> tuple[list[dict], dict[str, str]]:
    """``build()`` -> (rows, third-party errors), read from or written to the cache when this
    process has not imported torch yet. A listing with load errors is not cached."""
    if "torch" in sys.modules:
        return build()
    path = cache_dir() / f"registry-{cache_key()}.json"
    try:
        rows = json.loads(path.read_text())["rows"]
        if isinstance(rows, list) and all(isinstance(r, dict) for r in rows):
            return rows, {}
    except (OSError, ValueError, KeyError, TypeError):
        pass  # missing or damaged: built again
    rows, errors = build()
    if not errors:
        _write(path, rows)
    return rows, errors


def _write(path: Path, rows: list[dict]) -> None:
    """Write atomically and keep the KEEP newest listings (several environments may share
    the cache dir); a failure only costs the speed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"rows": rows}))
        tmp.replace(path)
        listings = sorted(path.parent.glob("registry-*.json"),
                          key=lambda p: p.stat().st_mtime_ns, reverse=True)
        for old in listings[KEEP:]:
            old.unlink(missing_ok=True)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
