"""virtio-net over a host tap: mergeable RX buffers, checksum/TSO offloads, optional vhost-net."""
