"""Volumes on NEBULA.

- :mod:`.tinyvol`   the TinyVol manifest format (64-byte header, 48-byte ChunkRefs;
  version 2: extent maps, disk ranges onto byte ranges of chunks)
- :mod:`.volume`    ``VolumeStore`` (named volumes under ``<store>/volumes``: create,
  import/export raw, clone, snapshot, commit into a ShareVol base, delete) and
  ``Volume`` (a copy-on-write DeltaVol: read/write at any offset, flush)
- :mod:`.blockdev`  ``BlockDevice``, the 512-byte-sector view virtio-stellar uses
  (over a volume or an image disk)
- :mod:`.filetree`  file-tree manifests for image layers: capture, restore, stack
  (OCI whiteouts), diff_trees; files under 4 KiB go into Cosmic Packs
  (:mod:`stellarium_core.nebula.cosmic`)
- :mod:`.erofs`     EROFS metadata for a tree whose file data already is chunks
- :mod:`.imagedisk` ``ImageDisks``/``ImageDisk``: an image's VM form, a read-only
  EROFS disk over the image's own chunks (only metadata is new)
"""
