"""The two errors a run ends on with exit status 2, their message naming the field (or file and line) and
the fix. Light on purpose (no torch): reward workers raise them too."""


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field and the fix."""


class DataError(ValueError):
    """A dataset file or sample is unusable; the message says where and how to fix it."""
