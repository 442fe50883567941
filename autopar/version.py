"""autopar's version, in a module of its own so that any layer (the Plan records it) can read it
without importing the package root, which imports everything."""

__version__ = "0.1.0"
