"""/openapi.json tells clients and fuzzers what each route needs and every error it can give
(issue 19, point 7). Checked by walking the application's routes, so a route added later is
held to the same rules without being named here."""

from __future__ import annotations

import pytest
from fastapi.routing import APIRoute, iter_route_contexts

from pipeline_console.app import create_app
from pipeline_console.auth.dependencies import Public, Requires
from pipeline_console.config import Settings

PROBLEM = "application/problem+json"
PROBLEM_REF = "#/components/schemas/ProblemDetails"
DECLARED_ONLY = ("404", "409", "413", "415")  # answers a route gives only if it declares them


def requirement(dependant) -> Requires | Public | None:
    for dependency in dependant.dependencies:
        if isinstance(dependency.call, Requires | Public):
            return dependency.call
        found = requirement(dependency)
        if found is not None:
            return found
    return None


def operations(app):
    """(method, path, route context, operation) for every route the document describes."""
    document = app.openapi()
    found = []
    for context in iter_route_contexts(app.routes):
        if not isinstance(context.original_route, APIRoute) or not context.include_in_schema:
            continue
        for method in sorted(context.methods):
            operation = document["paths"][context.path_format][method.lower()]
            found.append((method, context.path_format, context, operation))
    assert len(found) > 40
    return found


@pytest.fixture(scope="module")
def app():
    return create_app(Settings())


def test_the_document_is_valid_openapi(app):
    import openapi_spec_validator  # a dev dependency: a missing one must fail, not skip

    openapi_spec_validator.validate(app.openapi())


def test_the_bearer_scheme_is_declared(app):
    scheme = app.openapi()["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")


class TestEveryRoute:
    def test_a_route_that_requires_a_role_says_so_and_documents_401_and_403(self, app):
        for method, path, context, operation in operations(app):
            needs = requirement(context.dependant)
            assert needs is not None, (method, path)  # tests/test_auth.py says which
            if isinstance(needs, Public):
                assert "security" not in operation, (method, path)
                assert not {"401", "403"} & set(operation["responses"]), (method, path)
            else:
                assert operation["security"] == [{"bearerAuth": []}], (method, path)
                assert {"401", "403"} <= set(operation["responses"]), (method, path)
                assert "WWW-Authenticate" in operation["responses"]["401"]["headers"]

    def test_422_where_there_are_parameters_or_a_body_and_only_there(self, app):
        for method, path, _, operation in operations(app):
            takes_input = bool(operation.get("parameters") or operation.get("requestBody"))
            assert ("422" in operation["responses"]) == takes_input, (method, path)

    def test_every_route_but_healthz_documents_503_with_retry_after(self, app):
        for method, path, _, operation in operations(app):
            if path == "/healthz":
                assert "503" not in operation["responses"]
                continue
            unavailable = operation["responses"].get("503")
            assert unavailable is not None, (method, path)
            assert "Retry-After" in unavailable["headers"], (method, path)

    def test_400_for_a_host_not_allowed_everywhere_but_the_probes(self, app):
        for method, path, _, operation in operations(app):
            assert ("400" in operation["responses"]) == (path not in ("/healthz", "/readyz")), (
                method, path)

    def test_conflicts_and_media_types_only_where_the_route_declares_them(self, app):
        for method, path, context, operation in operations(app):
            declared = {str(status) for status in context.responses}
            for status in DECLARED_ONLY:
                assert (status in operation["responses"]) == (status in declared), (
                    method, path, status)

    def test_every_error_answer_is_a_problem_document_and_none_is_a_500(self, app):
        for method, path, _, operation in operations(app):
            assert "500" not in operation["responses"], (method, path)
            for status, response in operation["responses"].items():
                if int(status) < 400:
                    continue
                assert response["content"][PROBLEM]["schema"] == {"$ref": PROBLEM_REF}, (
                    method, path, status)
                json_body = response["content"].get("application/json")
                assert json_body is None or json_body["schema"]["$ref"] != PROBLEM_REF


def test_console_pages_are_not_in_the_document(app):
    for context in iter_route_contexts(app.routes):
        route = context.original_route
        if isinstance(route, APIRoute) and context.include_in_schema:
            assert not (isinstance(needs := requirement(context.dependant), Requires)
                        and needs.cookie), context.path_format
            assert context.path_format.startswith(("/api/", "/healthz", "/readyz",
                                                   "/metrics")), context.path_format


def test_open_metrics_need_no_token_and_disabled_auth_needs_none_anywhere():
    metrics = create_app(Settings(metrics_auth="open")).openapi()["paths"]["/metrics"]["get"]
    assert "security" not in metrics and "401" not in metrics["responses"]
    for methods in create_app(Settings(auth="disabled")).openapi()["paths"].values():
        for operation in methods.values():
            assert "security" not in operation


def nowhere(parameter: dict) -> str | int:
    """A path value that names nothing."""
    schema = parameter.get("schema", {})
    if schema.get("type") == "integer":
        return 999_999_999
    return "customer:nothing-here" if parameter["name"] == "key" else "nothing-here"


async def test_a_host_not_allowed_is_answered_as_the_document_says(client):
    document = client.app.openapi()
    for path in ("/api/v1/dashboard", "/api/v1/records", "/metrics", "/healthz"):
        response = await client.get(path, headers={"Host": "rebound.example"})
        assert str(response.status_code) in document["paths"][path]["get"]["responses"], (
            path, response.status_code)
    assert (await client.get("/api/v1/dashboard",
                             headers={"Host": "rebound.example"})).status_code == 400


async def test_what_names_nothing_is_answered_as_the_document_says(client):
    """The 404s: each route with a path parameter, asked about nothing, answers a status its
    document lists (a 404 it does not document would be a lie)."""
    document = client.app.openapi()
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            parameters = [p for p in operation.get("parameters", []) if p["in"] == "path"]
            if not parameters:
                continue
            url = path.format(**{p["name"]: nowhere(p) for p in parameters})
            body = {"json": {}} if "requestBody" in operation else {}
            response = await client.request(method.upper(), url, **body)
            assert str(response.status_code) in operation["responses"], (
                method, path, response.status_code, response.text)
