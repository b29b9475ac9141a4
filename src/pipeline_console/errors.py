"""Domain errors. They carry no HTTP; api/problems.py maps them to RFC 9457 once."""

from dataclasses import dataclass
from typing import Any


class DomainError(Exception):
    """Base of every error a service raises on purpose."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(DomainError):
    pass


class Conflict(DomainError):
    pass


@dataclass(frozen=True)
class FieldError:
    field: str
    message: str
    location: str = "body"
    type: str = "invalid"

    def as_dict(self) -> dict[str, Any]:
        return {"field": self.field, "location": self.location, "message": self.message,
                "type": self.type}


class InvalidInput(DomainError):
    def __init__(self, detail: str, errors: list[FieldError] | None = None) -> None:
        super().__init__(detail)
        self.errors = errors or []


class TooLarge(DomainError):
    pass




class Unauthorized(DomainError):
    """No credentials, or credentials that are unknown or revoked."""


class Forbidden(DomainError):
    """Known credentials whose role may not do this."""
