"""Only for the C extension: cffi builds ``_blkring`` from blkring.c (see blkring_build.py).
Everything else about the distribution is in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["stellarium_virtio_stellar/blkring_build.py:ffibuilder"])
