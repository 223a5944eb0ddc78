"""crystaloop.loop."""
