"""Build shim for `pip install openfold==0.0.1`: its setup.py imports `scripts.utils.get_nvidia_cc`,
which the PyPI sdist does not ship. `make setup` puts this folder on PYTHONPATH for that one build.
Reporting no GPU makes the build compile OpenFold's CPU stub of its attention kernel
(`apps.protein.compat` stands in for it)."""


def get_nvidia_cc():
    return None, None
