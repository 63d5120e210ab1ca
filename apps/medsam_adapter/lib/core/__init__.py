"""Model core: backbones, adapters, heads, preprocessing, prompts, caches, prediction, propagation.

Plain PyTorch/NumPy; never imports MONAI Label."""
