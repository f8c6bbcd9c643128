"""The device side's C part through cffi: the UDP express (express.c).

`AVAILABLE` says whether the compiled module `vhostnet.native._express`
imported (it is built at install by setup.py's cffi_modules, or in place by
`python vhostnet/native/build.py`); `REASON` why not. There is no Python
twin: without the module the express is off and every datagram takes the
stack's path, which is what the express would have done, only slower.
VHOSTNET_NATIVE=0 turns it off too, with the stack's own C.
"""
from __future__ import annotations

import os

__all__ = ["AVAILABLE", "REASON", "ffi", "lib", "describe"]

ffi = lib = None
if os.environ.get("VHOSTNET_NATIVE", "1") == "0":
    REASON = "VHOSTNET_NATIVE=0"
else:
    try:
        from ._express import ffi, lib
        REASON = ""
    except ImportError as e:  # not built: a plain checkout, or no compiler at install
        REASON = (f"extension not built ({e}): python vhostnet/native/build.py, "
                  "or pip install -e .")

AVAILABLE = lib is not None


def describe() -> dict:
    return {"available": AVAILABLE, "reason": REASON}
