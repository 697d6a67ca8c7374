"""aiprime: Mixture-of-Experts, retrieval-augmented generation and multimodal search."""

__version__ = "0.1.0"
