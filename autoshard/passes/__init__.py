"""Compiler passes, one per file; each has ``name`` and ``run(program) -> program``."""
