"""The exceptions users see: a message a person can act on (the server maps each to its 4xx).

Callers catch them by type, never by matching the message: `ModelMissing(model="stylegan2")` says
which model to train first, whatever its message.
"""

from __future__ import annotations


class LabelFactoryError(ValueError):
    """Bad input or a missing prerequisite, with a message that says what to do."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class ModelMissing(LabelFactoryError):
    """No usable model file for `model` (absent, corrupt, or made for another model): train it first (409)."""

    def __init__(self, message: str, model: str):
        super().__init__(message, status=409)
        self.model = model
