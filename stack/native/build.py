"""cffi build script for stack.native._native (API mode, compiled at install).

setup.py names this file in `cffi_modules`, so `pip install -e .` (and a
wheel build) compiles native.c into the extension module
`stack/native/_native*.so`.  For a source tree used through PYTHONPATH
without installing, `python stack/native/build.py` builds it in place.

The declarations below are the whole C surface; stack/native/__init__.py
wraps each one and falls back to stack/native/fallback.py when the
extension was not built.
"""
from __future__ import annotations

import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

CDEF = """
uint32_t vn_ones_sum(const char *buf, size_t n, uint32_t start);
uint32_t vn_l4_sum(const char *buf, size_t buf_len, size_t off, size_t n,
                   const char *src, const char *dst, uint32_t proto);
size_t vn_copy(char *const *dst, const size_t *dlen, size_t nd,
               const char *const *src, const size_t *slen, size_t ns);
long vn_segment_tcp(const char *frame, size_t n, uint32_t ihl, uint32_t doff,
                    uint32_t tot, uint32_t gso, uint32_t count, int partial,
                    char *outbuf, size_t cap, uint32_t *seg_len);
int vn_icmp_echo_reply(const char *request, size_t req_len, size_t end,
                       char *outbuf, size_t out_len, const char *gw_mac, size_t mac_len,
                       uint32_t ident);
long vn_scatter_region(char *region, size_t region_len, const size_t *offs, const size_t *lens,
                       size_t n, const char *hdr, size_t hlen, const char *data, size_t dlen);
long vn_split_take_writable(const uint16_t *avail, size_t avail_words, const char *desc, size_t desc_len,
                            uint8_t *held, size_t held_len, int checks, uint32_t num, uint32_t last,
                            uint32_t ahead, uint64_t r_gpa, uint64_t r_end, uint64_t need,
                            uint32_t min_len, uint32_t max_take,
                            uint64_t *heads, uint64_t *offs, uint64_t *lens, uint64_t *room);
long vn_split_put_frame(const uint16_t *avail, size_t avail_words, const char *desc, size_t desc_len,
                        uint8_t *held, size_t held_len, int checks, uint32_t *used, size_t used_words,
                        uint32_t num, uint32_t last, uint32_t ahead, uint32_t used_idx,
                        char *region, uint64_t r_gpa, uint64_t r_size, uint32_t min_len, uint32_t max_take,
                        const char *hdr, size_t hlen, const char *data, size_t dlen, uint32_t count_off,
                        uint64_t *heads);
long vn_split_put_frames(const uint16_t *avail, size_t avail_words, const char *desc, size_t desc_len,
                         uint8_t *held, size_t held_len, int checks, uint32_t *used, size_t used_words,
                         uint32_t num, uint32_t last, uint32_t ahead, uint32_t used_idx,
                         char *region, uint64_t r_gpa, uint64_t r_size, uint32_t max_take,
                         const char *blob, size_t blob_len, const uint32_t *lens, size_t nframes,
                         uint64_t *heads);
long vn_split_take_readable(const uint16_t *avail, size_t avail_words, const char *desc, size_t desc_len,
                            uint8_t *held, size_t held_len, int checks, uint32_t num, uint32_t last,
                            uint32_t ahead, uint64_t r_gpa, uint64_t r_end, uint32_t max_take,
                            uint64_t *heads, uint64_t *offs, uint64_t *lens);
long vn_split_put_used(uint32_t *used, size_t used_words, uint32_t num, uint32_t used_idx,
                       const uint64_t *heads, size_t n, uint32_t len);
long vn_packed_avail_run(const char *desc, size_t desc_len, uint32_t num, uint32_t pos, int wrap,
                         uint32_t limit);
long vn_packed_put_frames(char *desc, size_t desc_len, uint8_t *seen, size_t seen_len, uint32_t num,
                          uint32_t avail_pos, int avail_wrap, uint32_t used_pos, int used_wrap,
                          uint32_t free_slots, char *region, uint64_t r_gpa, uint64_t r_size,
                          uint32_t max_take, const char *blob, size_t blob_len,
                          const uint32_t *lens, size_t nframes, uint64_t *ids);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
with open(os.path.join(HERE, "native.c"), encoding="utf-8") as _f:
    ffibuilder.set_source(
        "stack.native._native", _f.read(),
        # -O3 vectorizes the checksum's four accumulators; no -march: the
        # module must run on whatever x86-64 the wheel lands on.
        extra_compile_args=["-O3", "-std=c99", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
    )

if __name__ == "__main__":
    # In-place build for a source checkout: the .so lands next to this file.
    root = os.path.dirname(os.path.dirname(HERE))
    ffibuilder.compile(tmpdir=os.path.join(root, "build", "cffi"), verbose=False)
    import glob
    import shutil
    for so in glob.glob(os.path.join(root, "build", "cffi", "stack", "native", "_native*.so")):
        shutil.copy2(so, HERE)
        print("built", os.path.join(HERE, os.path.basename(so)))
