"""FastCDC (content-defined) and fixed-grid chunkers for Stellarium."""
