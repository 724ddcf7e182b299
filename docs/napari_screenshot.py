"""Rebuild docs/napari.png: the cellseg widget docked in napari, run on an ssTEM section.

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/napari_screenshot.py \\
        CHECKPOINT ../shared/data/sstem/stack1/raw/00.tif docs/napari.png

Needs ``pip install "cellseg[napari]"`` and an X server for OpenGL (Xvfb here).
"""

import sys

import napari
import tifffile
from PIL import Image
from qtpy.QtCore import QEventLoop


def main(checkpoint: str, image_path: str, out: str) -> None:
    viewer = napari.Viewer(show=False)
    viewer.window.resize(1500, 900)
    viewer.add_image(tifffile.imread(image_path), name="ssTEM section")
    _, widget = viewer.window.add_plugin_dock_widget("cellseg", "Segment (cellseg)")
    widget.model.value = checkpoint
    worker = widget()  # what the "Run" button does: segments in a thread
    done = QEventLoop()
    worker.finished.connect(done.quit)
    done.exec()  # the labels layer is added as the worker returns, before it finishes
    viewer.layers["ssTEM section cellseg"].opacity = 0.45
    shot = Image.fromarray(viewer.screenshot(canvas_only=False, flash=False)).convert("RGB")
    shot.quantize(128).save(out, optimize=True)  # a palette PNG: small enough for git
    viewer.close()


if __name__ == "__main__":
    main(*sys.argv[1:4])
