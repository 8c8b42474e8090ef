"""Volumes on NEBULA: TinyVol manifests, ShareVol bases, DeltaVol CoW layers,
the sector view for virtio-stellar, file-tree manifests and Cosmic Packs."""
