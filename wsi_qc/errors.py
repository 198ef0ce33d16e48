"""One exception family: every error wsi-qc raises on purpose is a WSIQCError."""


class WSIQCError(Exception):
    """Base of all wsi-qc errors; messages say what was wrong, the value seen, and the fix."""


class SlideError(WSIQCError, OSError):
    """A slide file cannot be opened or read as asked."""


class ConfigError(WSIQCError, ValueError):
    """A configuration value, argument or input set is invalid."""


class ScoreError(WSIQCError, ValueError):
    """A slide's tiles were scored NaN or inf (a damaged network or flow); the slide fails, nothing is stored."""


class NotFittedError(WSIQCError, AttributeError):
    """A flow, scorer or threshold was used before it was fitted or loaded."""
