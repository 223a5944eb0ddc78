"""crystaloop.generative.data."""
