"""steptitan: staged-growth, parameter-efficient pre-training on torchtitan + FSDP2."""

__version__ = "0.1.0"
