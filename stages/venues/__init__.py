"""Venue wire-format kernels: bytes in, schema records out, no I/O."""
