"""Gradient-reduction methods, one per file behind the tiny `Method` interface (see `_base`).

The registry and the public entry point are `switchagg.methods` (METHODS, make_method).
"""
