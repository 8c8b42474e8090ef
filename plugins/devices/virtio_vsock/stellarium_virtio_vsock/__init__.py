"""virtio-vsock with Firecracker's host side: unix sockets on the host, vsock in the guest."""
