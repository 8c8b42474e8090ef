"""virtio-stellar: a standard virtio-blk device whose disk is a Stellarium volume."""
