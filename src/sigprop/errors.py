"""One error family for the whole library.

Everything a user can cause (bad config, missing data, a diverging run) raises a
subclass of :class:`SigpropError`; the CLI turns it into one line on stderr and
exit code 2. Anything else is a bug and keeps its traceback.
"""


class SigpropError(Exception):
    """Base class of every error the library raises on purpose."""


class ConfigError(SigpropError, ValueError):
    """A configuration value is invalid; the message names the key and the fix."""


class DataError(SigpropError):
    """A dataset is missing, truncated or corrupt; the message names the file."""


class TrainingError(SigpropError):
    """Training cannot go on (e.g. a non-finite loss); names the layer and step."""


class CheckpointError(SigpropError):
    """A checkpoint or run folder cannot be read."""


class InputError(SigpropError, ValueError):
    """A tensor given to the library API has the wrong type, shape or values; the
    message names the argument. Raised before any state changes."""


class RunFolderError(SigpropError):
    """A run folder cannot be used: not a folder, not writable, or in use by another run."""


class StorageError(SigpropError):
    """A file could not be written (no space left, no permission, a read-only disk);
    the message names the file, the reason, what was kept and how to go on."""
