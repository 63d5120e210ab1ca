"""MONAI Label train tasks (thin wrappers over lib.core.training)."""
