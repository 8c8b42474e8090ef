"""Volt: a KVM microVM monitor driven from Python through /dev/kvm ioctls."""

__version__ = "0.1.0"
