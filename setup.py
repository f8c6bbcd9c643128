"""Build hook for the compiled parts: the cffi extensions stack.native._native
and vhostnet.native._express.

Everything else about the package is declared in pyproject.toml; setuptools
reads both. `cffi_modules` runs stack/native/build.py's FFI builder and
compiles stack/native/native.c (API mode), so `pip install -e .` and wheel
builds produce stack/native/_native*.so; vhostnet/native/build.py does the
same for vhostnet/native/express.c (the UDP express). It needs a C compiler and the
Python headers (gcc and python3-dev in scripts/setup.sh). Without the
extension the package still works on its pure-Python fallback
(stack/native/__init__.py chooses) and without the express
(vhostnet/native/__init__.py).
"""
from setuptools import setup

setup(cffi_modules=["stack/native/build.py:ffibuilder", "vhostnet/native/build.py:ffibuilder"])
