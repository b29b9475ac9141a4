"""Domain errors. They carry no HTTP; api/problems.py maps them to RFC 9457 once."""

from collections.abc import Mapping
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


class FieldValueError(ValueError):
    """Raised by a model's validator about one of its fields (`field`, a dot path below the
    model): the error then names that field, not the model (error_path)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def error_path(error: Mapping[str, Any], document: Any) -> list[str]:
    """The path of the field a pydantic error is about, as the client wrote it (`document`:
    the input validated). Without the tag pydantic puts after a discriminated union's field
    (auth.bearer.token is the client's auth.token), and with the field a model's validator
    named (FieldValueError) after the model's own path (auth.token_url, not auth)."""
    path: list[str] = []
    node = document
    for part in error.get("loc", ()):
        if (isinstance(node, dict) and isinstance(part, str) and part not in node
                and node.get("type") == part):
            continue  # the union member's tag: pydantic's step, not the client's
        path.append(str(part))
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            node = None
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, FieldValueError):
        path.extend(cause.field.split("."))
    return path


class TooLarge(DomainError):
    pass




class Unauthorized(DomainError):
    """No credentials, or credentials that are unknown or revoked."""


class Forbidden(DomainError):
    """Known credentials whose role may not do this."""
