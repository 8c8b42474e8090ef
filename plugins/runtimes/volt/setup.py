"""Only for the C extension: cffi builds ``volt.vmm._vcpurun`` from vcpurun.c (see
vcpurun_build.py). Everything else about the distribution is in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["volt/vmm/vcpurun_build.py:ffibuilder"])
