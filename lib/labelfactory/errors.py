"""The one exception type users see: a message a person can act on (the server maps it to a 4xx)."""


class LabelFactoryError(ValueError):
    """Bad input or a missing prerequisite, with a message that says what to do."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status
