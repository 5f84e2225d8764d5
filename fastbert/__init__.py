"""fastbert: BERT for PyTorch with fused Triton kernels, a drop-in for transformers' Bert classes."""
__version__ = "0.1.0"
