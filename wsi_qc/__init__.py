"""wsi-qc: quality control of histopathology whole-slide images with the RL2 metric."""

__version__ = "0.1.0"

from wsi_qc.errors import ConfigError, NotFittedError, SlideError, WSIQCError

__all__ = ["ConfigError", "NotFittedError", "SlideError", "WSIQCError", "__version__"]
