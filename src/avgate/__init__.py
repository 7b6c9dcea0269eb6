"""avgate: an antivirus content-scanning gateway."""

__version__ = "0.1.0"
