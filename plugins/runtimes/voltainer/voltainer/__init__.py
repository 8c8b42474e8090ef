"""Voltainer: run a Stellarium image under systemd-nspawn without extracting it.

The root is an overlayfs whose lower layer is a read-only FUSE view of the
image's file-tree manifest, read straight from NEBULA chunks, and whose upper
layer is a per-container scratch directory discarded on exit.
"""
