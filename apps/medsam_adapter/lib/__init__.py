"""medsam_adapter app code: ``core`` (plain PyTorch/NumPy) and thin MONAI Label glue."""
