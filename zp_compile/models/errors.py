"""The error a checkpoint directory raises when the loader cannot read it; its own module so that the
loader and the quantized formats it reads (``quantized.py``) both raise it without importing each other."""


class CheckpointError(ValueError):
    """The checkpoint does not match the model its config describes, or is stored in a form we do not read."""
