"""crystaloop.dft.espresso."""
