"""One base class for errors a user can act on: the CLI prints their message, not a traceback."""


class FVGPTError(RuntimeError):
    pass


class DataError(FVGPTError):
    """A dataset that cannot be read as asked; the message names the folder or file searched and what to do."""
