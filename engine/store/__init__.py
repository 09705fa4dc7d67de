"""Files on disk: PNG outputs and their metadata, atomic writes, in-memory caches."""
