"""cffi build script for vhostnet.native._express (API mode, compiled at install).

The device side's one C part: the UDP express (express.c), which sends on
host sockets, so it lives here and not in stack/native (the stack does no
I/O). setup.py names this file in `cffi_modules` beside stack/native/build.py;
for a source tree used through PYTHONPATH, `python vhostnet/native/build.py`
builds it in place.
"""
from __future__ import annotations

import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

CDEF = """
typedef struct {
    uint8_t gw_mac[6];
    uint8_t guest_mac[6];
    uint8_t guest_ip[4];
} vn_xconf;
typedef struct {
    uint64_t key;
    int32_t fd;
    int32_t err;
    uint32_t sent;
    uint32_t dropped;
    uint32_t failed;
    uint32_t dirty;
    uint64_t bytes;
} vn_xflow;
long vn_x_insert(int32_t *idx, uint32_t mask, vn_xflow *ent, uint64_t key, int32_t e);
long vn_x_remove(int32_t *idx, uint32_t mask, const vn_xflow *ent, uint64_t key);
void vn_x_rebuild(int32_t *idx, uint32_t mask, vn_xflow *ent, uint32_t nent);
long vn_x_send(const char *frame, size_t n, int csum_ok, const vn_xconf *c,
               const int32_t *idx, uint32_t mask, vn_xflow *ent,
               uint32_t *dirty, uint32_t *ndirty);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
with open(os.path.join(HERE, "express.c"), encoding="utf-8") as _f:
    ffibuilder.set_source(
        "vhostnet.native._express", _f.read(),
        extra_compile_args=["-O2", "-std=gnu99", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
    )


def build_in_place(root: str) -> str:
    """Compile into ROOT/build/cffi and copy the module next to this file; its path."""
    import glob
    import shutil
    ffibuilder.compile(tmpdir=os.path.join(root, "build", "cffi"), verbose=False)
    for so in glob.glob(os.path.join(root, "build", "cffi", "vhostnet", "native", "_express*.so")):
        shutil.copy2(so, HERE)
        return os.path.join(HERE, os.path.basename(so))
    raise RuntimeError("cffi built no _express module")


if __name__ == "__main__":
    print("built", build_in_place(os.path.dirname(os.path.dirname(HERE))))
