"""Pydantic validation errors as the API's 422 problem: each invalid field named by its dotted
camelCase path, with a message a person can act on."""

from __future__ import annotations

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from lib.http import Problem
from lib.models import FieldError

_MESSAGES = {
    "missing": "is required",
    "extra_forbidden": "is not a known field",
    "model_type": "must be a JSON object",
    "model_attributes_type": "must be a JSON object",
    "dict_type": "must be a JSON object",
    "list_type": "must be a JSON array",
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "int_from_float": "must be a whole number",
}


def _field(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(body)"


def _message(error: ErrorDetails) -> str:
    if error["type"] in _MESSAGES:
        return _MESSAGES[error["type"]]
    if error["type"] == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        return f"must be one of {expected.replace("'", '')}"
    message = error["msg"]
    return message.removeprefix("Value error, ")


def validation_problem(error: ValidationError) -> Problem:
    errors = [FieldError(field=_field(e["loc"]), message=_message(e)) for e in error.errors()]
    count = len(errors)
    return Problem(
        422,
        "validation-error",
        "Invalid quote request",
        f"{count} field{' is' if count == 1 else 's are'} invalid",
        errors=errors,
    )
