"""Built-in optimizers, one file each. See docs/optimizers.md."""
