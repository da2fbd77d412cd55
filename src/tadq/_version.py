"""The package version, in a leaf module so that artefact writers can read it without importing ``tadq``."""

__version__ = "0.1.0"
