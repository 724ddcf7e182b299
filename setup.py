"""Packages are found, not listed: registry/ and cli/ sit at the top of the repository but
install inside the one namespace cellseg_plugins (everything else is in pyproject.toml)."""

from setuptools import find_packages, setup

ROOTS = {"cellseg_plugins": "cellseg_plugins", "cellseg_plugins.registry": "registry",
         "cellseg_plugins.cli": "cli"}

DATA = ["cellseg_plugins.data"]  # package data without code (the ssTEM checksums)

setup(
    package_dir=ROOTS,
    packages=[f"{name}.{sub}" if sub else name
              for name, folder in ROOTS.items() for sub in ["", *find_packages(folder)]] + DATA,
)
