"""Pipeline stages: pure functions from in-memory inputs to in-memory outputs, built from ``kernels``."""
