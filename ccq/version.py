"""The package version, importable without importing the rest of ccq."""

__version__ = "0.1.0"
