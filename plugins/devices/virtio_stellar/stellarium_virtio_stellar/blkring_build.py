"""Builds :mod:`stellarium_virtio_stellar._blkring` (cffi, API mode) from ``blkring.c``.

Run by setuptools at install time (``cffi_modules`` in setup.py): the project's
machines have gcc and the Python headers (make.py installs them).
"""

from pathlib import Path

from cffi import FFI

CDEF = """
struct vb_region { uint64_t gpa, size; uint8_t *host; };
struct seg { ...; };
struct vb_dev {
    struct vb_region regions[8];
    int nregions;
    uint32_t qsize;
    uint64_t desc_gpa, avail_gpa, used_gpa;
    uint16_t last_avail, used_idx, signalled_used;
    int event_idx;
    int fd;
    uint64_t sectors;
    int readonly;
    uint32_t shift;
    uint64_t nslots;
    const uint8_t **slots;
    uint8_t serial[20];
    uint32_t serial_len;
    uint64_t max_request;
    uint32_t *seen;
    struct seg *seg;
    uint16_t slow_head;
    uint32_t used_since_signal;
    char error[160];
    uint64_t served, slowed;
    uint64_t requests, errors, read_bytes, write_bytes, latency_ns, latency_ns_max;
    ...;
};
int vb_drain(struct vb_dev *d);
int vb_complete(struct vb_dev *d, uint16_t head, uint32_t written);
int vb_wants_interrupt(struct vb_dev *d);
long long vb_serve_one(struct vb_dev *d, uint16_t head);
#define VB_EMPTY ...
#define VB_SLOW ...
#define VB_BROKEN ...
#define VB_SLOW_REQUEST ...
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("stellarium_virtio_stellar._blkring",
                      (Path(__file__).with_name("blkring.c")).read_text(),
                      extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
