"""Sequence and CFG parallelism: mesh, token sharding, distributed attention."""
