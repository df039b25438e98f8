"""The one place the package version is written (pyproject.toml reads it; ``fastpeft.__version__``)."""
__version__ = "0.1.0"
