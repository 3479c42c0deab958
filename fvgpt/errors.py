"""One base class for errors a user can act on: the CLI prints their message, not a traceback."""


class FVGPTError(RuntimeError):
    pass
