"""MONAI Label infer tasks (thin wrappers over lib.core.engine)."""
