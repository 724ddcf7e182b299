import pytest
import re
import runpy
import subprocess
import sys

from conftest import ROOT

import cellseg_plugins as cs


def readme_plugin_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Writing a plugin", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_is_the_example_file():
    assert readme_plugin_block() == (ROOT / "examples" / "custom_plugin.py").read_text()


def test_readme_plugin_example_runs():
    try:
        runpy.run_path(str(ROOT / "examples" / "custom_plugin.py"), run_name="__main__")
        assert "bottleneck_noise" in cs.list_plugins()
    finally:
        if "bottleneck_noise" in cs.list_plugins():
            cs.registry.unregister("bottleneck_noise")


@pytest.mark.slow
def test_wrap_smp_model_example_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "wrap_smp_model.py")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "output: (2, 5, 128, 128)" in proc.stdout


@pytest.mark.slow
def test_train_from_python_example_runs(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "train_from_python.py"),
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "epoch 2: val mIoU" in proc.stdout and "test mIoU" in proc.stdout
    assert (tmp_path / "run" / "best.pt").is_file()
