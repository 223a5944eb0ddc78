"""crystaloop.dft."""
