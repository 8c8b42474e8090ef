"""virtio-rng: the host's getrandom as the guest's hardware RNG, rate-limited."""
