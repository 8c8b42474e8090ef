"""Builds :mod:`volt.vmm._vcpurun` (cffi, API mode) from ``vcpurun.c`` at install time
(``cffi_modules`` in setup.py; make.py installs gcc and the Python headers)."""

from pathlib import Path

from cffi import FFI

ffibuilder = FFI()
ffibuilder.cdef("""
struct vr_read { uint64_t addr; const uint32_t *value; };
int vr_run(int fd, void *run, const struct vr_read *reads, int nreads, uint64_t *answered);
""")
ffibuilder.set_source("volt.vmm._vcpurun", Path(__file__).with_name("vcpurun.c").read_text(),
                      extra_compile_args=["-O2", "-Wall", "-Wextra"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
