"""zstd chunk compression for NEBULA (``stellarium.compressors: zstd``)."""
