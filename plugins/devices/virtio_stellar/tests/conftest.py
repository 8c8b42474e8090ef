"""The lab and guest-kernel fixtures, when the volt runtime plugin is installed."""

try:
    from volt.lab.pytest_plugin import guest_kernel, lab  # noqa: F401
except ImportError:          # the boot test skips itself then
    pass
