"""Training: configs, data, the generic loop, model tasks and registration."""
