"""Confinement of the VMM: Landlock + capabilities + seccomp per thread kind, and the jailer.

``policy`` says what one VM may touch; ``confine`` applies it to a built VMM
(``landlock``, ``caps``, ``seccomp`` do one mechanism each); ``jailer`` is
``volt jail``, which prepares a chroot, namespaces, cgroups and an unprivileged
uid around the VMM before it even starts.
"""
