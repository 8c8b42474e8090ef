"""virtio-balloon: inflated guest pages go back to the host; deflate_on_oom; statistics."""
