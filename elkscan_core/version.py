"""elkscan's version, in a module of its own so that any module may import it without the package."""

__version__ = "0.1.0"
