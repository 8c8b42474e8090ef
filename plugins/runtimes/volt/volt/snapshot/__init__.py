"""VM snapshots in NEBULA: guest RAM as mappable chunks (:mod:`.pages`), one manifest
chunk naming everything else (:mod:`.manifest`), bound to a name (:mod:`.catalog`);
taken from a paused VM and restored into a new one by :mod:`.machine`."""
