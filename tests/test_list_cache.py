"""`cellseg list` reads the registry's listing from a cache keyed by what it depends on."""

import json
import os
import subprocess
import sys

import pytest

from cellseg_plugins.cli import list_cache
from test_third_party import install

ROWS = [{"name": "unet", "kind": "arch", "description": "U-Net", "params": []}]


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A process that has not imported torch, with its cache in tmp_path/cache."""
    monkeypatch.delitem(sys.modules, "torch")
    monkeypatch.setenv("CELLSEG_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


class Builder:
    def __init__(self, errors=None):
        self.calls, self.errors = 0, errors or {}

    def __call__(self):
        self.calls += 1
        return ROWS, self.errors


def test_built_once_then_read_and_the_newest_listings_kept(fresh):
    build = Builder()
    fresh.mkdir()
    for i in range(list_cache.KEEP):  # other environments' listings, oldest first
        old = fresh / f"registry-old{i}.json"
        old.write_text("{}")
        os.utime(old, ns=(10**9 * (i + 1),) * 2)
    assert list_cache.cached_listing(build) == (ROWS, {})
    assert list_cache.cached_listing(build) == (ROWS, {})
    assert build.calls == 1
    kept = sorted(p.name for p in fresh.iterdir())
    assert len(kept) == list_cache.KEEP and "registry-old0.json" not in kept
    assert f"registry-{list_cache.cache_key()}.json" in kept


def test_a_damaged_cache_is_built_again(fresh):
    build = Builder()
    list_cache.cached_listing(build)
    next(fresh.iterdir()).write_text('{"rows": [1, 2]')
    assert list_cache.cached_listing(build) == (ROWS, {})
    assert build.calls == 2
    assert json.loads(next(fresh.iterdir()).read_text()) == {"rows": ROWS}


def test_load_errors_are_not_cached(fresh):
    build = Builder(errors={"pkg": "ImportError: x"})
    assert list_cache.cached_listing(build) == (ROWS, {"pkg": "ImportError: x"})
    list_cache.cached_listing(build)
    assert build.calls == 2 and not fresh.exists()


def test_an_unwritable_cache_only_costs_speed(fresh):
    fresh.write_text("a file where the folder should be")
    build = Builder()
    assert list_cache.cached_listing(build) == (ROWS, {})
    assert list_cache.cached_listing(build) == (ROWS, {})
    assert build.calls == 2


def test_a_process_with_torch_never_uses_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("CELLSEG_CACHE_DIR", str(tmp_path))
    build = Builder()
    list_cache.cached_listing(build)
    list_cache.cached_listing(build)
    assert build.calls == 2 and list(tmp_path.iterdir()) == []


def test_key_follows_third_party_packages_and_their_sources(monkeypatch, tmp_path):
    before = list_cache.cache_key()
    install(tmp_path, "cellseg_keyed", "X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with_package = list_cache.cache_key()
    (tmp_path / "cellseg_keyed.py").write_text("X = 22\n")
    edited = list_cache.cache_key()
    assert len({before, with_package, edited}) == 3
    assert list_cache.cache_key() == edited  # stable while nothing changes


@pytest.mark.slow
def test_cellseg_list_twice_second_without_torch(tmp_path):
    """The second `cellseg list` prints the same listing and imports no torch."""
    run = ("import sys\nfrom cellseg_plugins.cli.main import main\n"
           "try:\n    main(['list', '--json'])\nexcept SystemExit:\n    pass\n"
           "print('torch imported:', 'torch' in sys.modules, file=sys.stderr)\n")
    env = {**os.environ, "CELLSEG_CACHE_DIR": str(tmp_path)}
    first, second = (subprocess.run([sys.executable, "-c", run], capture_output=True,
                                    text=True, env=env, timeout=120) for _ in range(2))
    assert "torch imported: True" in first.stderr
    assert "torch imported: False" in second.stderr, second.stderr
    assert json.loads(second.stdout) == json.loads(first.stdout)
    assert "classic_unet" in json.loads(second.stdout)
