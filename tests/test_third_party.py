"""Third-party packages register plugins through the entry-point group 'cellseg.plugins'."""

import json
import os
import subprocess
import sys
import textwrap

import pytest


def install(site, name, module_text, value=None):
    """A package as pip leaves it in a target folder: the module and its dist-info."""
    (site / f"{name}.py").write_text(textwrap.dedent(module_text))
    info = site / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[cellseg.plugins]\n{name} = {value or name}\n")


def cellseg(site, *argv):
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, "-m", "cellseg_plugins.cli.main", *argv],
                          capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.slow
def test_an_installed_package_adds_its_plugin_and_a_broken_one_is_one_line(tmp_path):
    install(tmp_path, "cellseg_double", """
        import cellseg_plugins as cs
        from cellseg_plugins.hooks import transform_encoder_features
        from torch import nn

        class Double(nn.Module):
            def forward(self, x):
                return 2 * x

        @cs.register_plugin("double_bottleneck")
        def double_bottleneck(model, factor: int = 2):
            '''Multiply the bottleneck by two (a third-party plugin).'''
            transform_encoder_features(model, "double", {-1: Double()})
            return model
    """)
    install(tmp_path, "cellseg_broken", "raise ImportError('needs libfoo')")
    listed = cellseg(tmp_path, "list", "double*", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["double_bottleneck"]["params"][0]["name"] == "factor"
    warning = [line for line in listed.stderr.splitlines() if "cellseg_broken" in line]
    assert warning == ["warning: plugin package 'cellseg_broken' failed to load "
                       "(ImportError: needs libfoo); skipped"]
    bench = cellseg(tmp_path, "bench", "classic_unet(width=4)+double_bottleneck", "--size", "32",
                    "--batch", "1", "--steps", "1", "--device", "cpu", "--json")
    assert bench.returncode == 0, bench.stderr  # the spec string builds with no import by the user
