"""RFC 9457 problem details: every error the API returns has this shape."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

PROBLEM_JSON = "application/problem+json"
_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    409: "Conflict",
    405: "Method Not Allowed",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class FieldError(BaseModel):
    field: str
    rule: str


class ProblemDetails(BaseModel):
    """An error answer (RFC 9457), as ``application/problem+json``. Some carry more members
    (RFC 9457 section 3.2), e.g. the codes a client may choose from."""

    model_config = ConfigDict(extra="allow")

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    instance: str
    errors: list[FieldError] | None = None


_CHALLENGE = {
    "WWW-Authenticate": {
        "description": 'The challenge: `Bearer realm="mes-hub"`',
        "required": True,
        "schema": {"type": "string"},
    }
}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before asking again (RFC 9110, delay-seconds)",
        "required": True,
        "schema": {"type": "integer", "minimum": 0},
    }
}


def problems(*statuses: int, retry_after: Collection[int] = (429,)) -> dict[int | str, Any]:
    """The ``responses`` of a route that may answer with these problems (for the OpenAPI
    schema; ``install_problem_handlers`` documents them as ``application/problem+json``), with
    the headers that come with them: ``WWW-Authenticate`` on 401, ``Retry-After`` on those of
    ``retry_after`` (a 429 always has one)."""
    answers: dict[int | str, Any] = {}
    for status in statuses:
        answers[status] = {"model": ProblemDetails, "description": _TITLES[status]}
        if status == 401:
            answers[status]["headers"] = _CHALLENGE
        elif status in retry_after:
            answers[status]["headers"] = _RETRY_AFTER
    return answers


class Problem(Exception):
    """An error answer. ``extensions`` are more members of the problem object (RFC 9457
    section 3.2), e.g. the codes a client may choose from; ``headers`` go with the answer, e.g.
    ``{"Retry-After": "1"}`` on a 429."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
        extensions: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.errors = errors
        self.headers = headers
        self.extensions = extensions


def problem_response(
    request: Request,
    status: int,
    detail: str,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
    extensions: dict[str, Any] | None = None,
) -> JSONResponse:
    # Extension members never replace the standard ones.
    body: dict[str, Any] = dict(extensions or {})
    body |= {
        "type": "about:blank",
        "title": _TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        "instance": request.url.path,
    }
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def install_problem_handlers(app: FastAPI) -> None:
    async def on_problem(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Problem)
        return problem_response(
            request, exc.status, exc.detail, exc.errors, exc.headers, exc.extensions
        )

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return problem_response(
            request, exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None)
        )

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = [
            {"field": ".".join(str(p) for p in e["loc"]), "rule": e["msg"]} for e in exc.errors()
        ]
        detail = "; ".join(f"{e['field']}: {e['rule']}" for e in errors)
        return problem_response(request, 422, detail, errors)

    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        return problem_response(request, 500, "internal error; see the hub's log")

    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        # FastAPI files every declared response under application/json; problems are not.
        if app.openapi_schema is None:
            schema = default_openapi()
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    for status, answer in operation.get("responses", {}).items():
                        content = answer.get("content", {})
                        if status[:1] in "45" and "application/json" in content:
                            content[PROBLEM_JSON] = content.pop("application/json")
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(Exception, on_error)
