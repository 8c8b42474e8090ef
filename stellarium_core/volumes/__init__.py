"""Volumes on NEBULA.

- :mod:`.tinyvol`   the TinyVol manifest format (64-byte header, 48-byte ChunkRefs)
- :mod:`.volume`    ``VolumeStore`` (named volumes under ``<store>/volumes``: create,
  import/export raw, clone, snapshot, commit into a ShareVol base, delete) and
  ``Volume`` (a copy-on-write DeltaVol: read/write at any offset, flush)
- :mod:`.blockdev`  ``BlockDevice``, the 512-byte-sector view virtio-stellar uses
- :mod:`.filetree`  file-tree manifests for image layers: capture, restore, stack
  (OCI whiteouts), diff_trees
- :mod:`.cosmic`    Cosmic Packs: files under 4 KiB packed 64 KiB at a time
"""
