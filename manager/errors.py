"""Errors the resource modules raise; the API and the CLI turn them into 4xx answers and messages."""

from manager.validation import ValidationError


class NotFound(LookupError):
    def __init__(self, what: str, ident: str):
        super().__init__(f"{what} {ident!r} not found")
        self.what = what
        self.ident = ident


class Conflict(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


__all__ = ["Conflict", "NotFound", "ValidationError"]
