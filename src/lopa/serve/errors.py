"""Error answers: ``{"error": {"message", "type", "param"}}`` (OpenAI's shape) with an HTTP status.

>>> error_body("no such model", "not_found_error", "model")
{'error': {'message': 'no such model', 'type': 'not_found_error', 'param': 'model'}}
>>> error_type(503), error_type(418), error_type(502)
('overloaded_error', 'invalid_request_error', 'server_error')
"""

from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError

TYPE_OF_STATUS = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                  405: "invalid_request_error", 408: "timeout_error", 413: "request_too_large",
                  422: "invalid_request_error", 503: "overloaded_error"}


class APIError(Exception):
    """An error answer: HTTP status, a message for the user, an OpenAI-style type and the field at fault."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param


def error_type(status: int) -> str:
    """The ``type`` of an error answer with this status when nothing more precise is known."""
    return TYPE_OF_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(message: str, type: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param}}


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """Pydantic's error list as one readable line, e.g. ``max_new_tokens: Input should be ...``; and the field."""
    parts, param = [], None
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            return f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}", None
        where = ".".join(loc) or "body"
        param = param or (loc[0] if loc else None)
        parts.append(f"{where}: {err.get('msg')}")
    return "; ".join(parts) or "invalid request", param
