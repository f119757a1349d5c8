"""User-facing error types: raised for bad input, caught by the CLI and server and shown as one line."""


class NanovllmError(Exception):
    """An error the user can fix (bad path, bad argument, unsupported model); never a bug."""


class ModelLoadError(NanovllmError):
    """The model could not be found, read or understood."""
