"""pertscale: single-cell perturbation models at CELLxGENE scale."""
__version__ = "0.1.0"
