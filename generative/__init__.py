"""crystaloop.generative."""
