"""crystaloop.generative.models."""
