"""Stellarium core: content-addressed storage contracts and the storage model.

The core owns the data model (NEBULA, volumes, tiers, boot and distribution) and
the plugin contracts; algorithms, devices, backends and runtimes arrive as separately
installable distributions found through entry points.
"""

__version__ = "0.1.0"
