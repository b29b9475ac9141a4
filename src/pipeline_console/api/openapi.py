"""/openapi.json, honest about security and errors.

The answers every route can give are derived from what the route declares, never from a
list of paths, so a route added later is described by the same rules:
- a route whose dependencies include `Requires` (auth/dependencies.py) needs the bearer token:
  `security: [{bearerAuth: []}]`, 401 (no or unknown token) and 403 (a role or scope that may
  not do this); public ones (/healthz, /readyz, /metrics when open) have neither;
- 422 where the route takes parameters or a body; none where it takes neither;
- 503 with Retry-After where the route reaches the database (a token lookup does), or where
  the route declares it (/readyz);
- 400 where the Host header is checked (every path but /healthz and /readyz:
  api/web_security.py's ALLOWED_HOSTS);
- 404, 409, 413, 415 only where the route declares them (`responses=`);
- no 500: a 500 is a bug, not an answer of the contract;
- every error answer is application/problem+json with the shared ProblemDetails schema.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute, iter_route_contexts
from pydantic import BaseModel

from pipeline_console.api.problems import (
    _DESCRIPTIONS,
    _TITLES,
    PROBLEM_MEDIA_TYPE,
    RETRY_AFTER_HEADER,
)
from pipeline_console.api.web_security import ANY_HOST_PATHS
from pipeline_console.auth.dependencies import MetricsAccess, Public, Requires
from pipeline_console.config import Settings

BEARER_AUTH = "bearerAuth"
PROBLEM_SCHEMA = "ProblemDetails"
PROBLEM_REF = f"#/components/schemas/{PROBLEM_SCHEMA}"
_GENERATED_NAME = "Problem"  # the pydantic model's own name (api/problems.py)

SECURITY_SCHEME = {
    "type": "http",
    "scheme": "bearer",
    "description": "An API token (`pipeline-console tokens create --role ROLE --name NAME`), "
                   "sent as `Authorization: Bearer <token>`. The console's session cookie is "
                   "not accepted by the API.",
}
_ERROR_DESCRIPTIONS = {
    401: "No token, or a token that is unknown, expired or revoked (WWW-Authenticate: "
         "Bearer)",
    403: "The token is valid but its role (or, for an ingest token, its sources) may not do "
         "this",
    400: "The Host header names a host this server does not answer to "
         "(PIPELINE_CONSOLE_ALLOWED_HOSTS)",
    422: "Invalid input: the `errors` list names each bad field",
}
# FastAPI's own 422 body, which this server never answers (api/problems.py maps validation
# errors to a problem): its schemas are dropped from the document with it.
_FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")
_REPLACED_BY_PROBLEM = {PROBLEM_REF, *(f"#/components/schemas/{name}"
                                       for name in _FASTAPI_VALIDATION_SCHEMAS)}
_WWW_AUTHENTICATE = {"description": 'Bearer realm="pipeline-console"',
                     "schema": {"type": "string"}}


def install_openapi(app: FastAPI, hand_parsed_bodies: list[type[BaseModel]]) -> None:
    """Make app.openapi() build the document once, with the rules above."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version,
                                   description=app.description, routes=app.routes)
            _add_schemas(document, hand_parsed_bodies)
            describe_security_and_errors(document, app.routes, app.state.settings)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _add_schemas(document: dict[str, Any], models: list[type[BaseModel]]) -> None:
    """Ingestion reads its bodies itself; add their schemas to the components."""
    components = document.setdefault("components", {}).setdefault("schemas", {})
    for model in models:
        model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(model_schema.pop("$defs", {}))
        components[model.__name__] = model_schema


def needs_token(dependant: Dependant, settings: Settings) -> bool:
    """Whether a route's dependencies (at any depth) ask for a bearer token."""
    if settings.auth == "disabled":
        return False
    for dependency in dependant.dependencies:
        call = dependency.call
        if isinstance(call, MetricsAccess):
            asks = settings.metrics_auth != "open"
        elif isinstance(call, Requires):
            asks = True
        else:
            asks = not isinstance(call, Public) and needs_token(dependency, settings)
        if asks:
            return True
    return False


def describe_security_and_errors(document: dict[str, Any], routes: list[Any],
                                 settings: Settings) -> None:
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    if _GENERATED_NAME in schemas:
        schemas[PROBLEM_SCHEMA] = {**schemas.pop(_GENERATED_NAME), "title": PROBLEM_SCHEMA}
    _rename_references(document)
    components.setdefault("securitySchemes", {})[BEARER_AUTH] = SECURITY_SCHEME
    for context in iter_route_contexts(routes):
        if not isinstance(context.original_route, APIRoute) or not context.include_in_schema:
            continue
        for method in context.methods:
            operation = document["paths"].get(context.path_format, {}).get(method.lower())
            if operation is not None:
                _describe_operation(operation, needs_token(context.dependant, settings),
                                    host_checked=context.path_format not in ANY_HOST_PATHS)
    for name in _FASTAPI_VALIDATION_SCHEMAS:  # the outer one first: it refers to the other
        if f'"#/components/schemas/{name}"'.encode() not in orjson.dumps(document):
            schemas.pop(name, None)


def _describe_operation(operation: dict[str, Any], token: bool, *, host_checked: bool) -> None:
    responses = operation.setdefault("responses", {})
    responses.pop("500", None)
    if host_checked:
        responses.setdefault("400", {})
    if token:
        operation["security"] = [{BEARER_AUTH: []}]
        responses.setdefault("401", {})["headers"] = {"WWW-Authenticate": _WWW_AUTHENTICATE}
        responses.setdefault("403", {})
    else:
        operation.pop("security", None)
        responses.pop("401", None)
        responses.pop("403", None)
    if operation.get("parameters") or operation.get("requestBody"):
        responses.setdefault("422", {})
    else:
        responses.pop("422", None)
    if token:
        responses.setdefault("503", {})
    if "503" in responses:
        responses["503"].setdefault("headers", {})["Retry-After"] = RETRY_AFTER_HEADER
    for status, response in responses.items():
        if status.isdigit() and int(status) >= 400:
            _as_problem(int(status), response)
    operation["responses"] = dict(sorted(responses.items()))


def _as_problem(status: int, response: dict[str, Any]) -> None:
    """Errors are answered as problem+json: drop the application/json twin that FastAPI adds
    for a `model`, keep any other body the route declares (/readyz's Readiness)."""
    response.setdefault("description", _ERROR_DESCRIPTIONS.get(status)
                        or _DESCRIPTIONS.get(status) or _TITLES.get(status, "Error"))
    content = {media: body for media, body in response.get("content", {}).items()
               if not (media == "application/json"
                       and body.get("schema", {}).get("$ref") in _REPLACED_BY_PROBLEM)}
    problem = content.setdefault(PROBLEM_MEDIA_TYPE, {})
    if not problem.get("schema"):
        problem["schema"] = {"$ref": PROBLEM_REF}
    response["content"] = content


def _rename_references(node: Any) -> None:
    old = f"#/components/schemas/{_GENERATED_NAME}"
    if isinstance(node, dict):
        if node.get("$ref") == old:
            node["$ref"] = PROBLEM_REF
        for value in node.values():
            _rename_references(value)
    elif isinstance(node, list):
        for value in node:
            _rename_references(value)
