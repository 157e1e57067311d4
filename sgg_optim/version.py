"""The library's version, in a module of its own: files it writes record it, and reading
it must not import the whole package."""

__version__ = "0.1.0"
