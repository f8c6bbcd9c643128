"""Build hook for the one compiled part: the cffi extension stack.native._native.

Everything else about the package is declared in pyproject.toml; setuptools
reads both. `cffi_modules` runs stack/native/build.py's FFI builder and
compiles stack/native/native.c (API mode), so `pip install -e .` and wheel
builds produce stack/native/_native*.so. It needs a C compiler and the
Python headers (gcc and python3-dev in scripts/setup.sh). Without the
extension the package still works on its pure-Python fallback
(stack/native/__init__.py chooses).
"""
from setuptools import setup

setup(cffi_modules=["stack/native/build.py:ffibuilder"])
