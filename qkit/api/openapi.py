"""The OpenAPI 3.1 document of the API, served at ``GET /api/openapi.json``.

:data:`BASE` holds the shared components and the core routes (workers,
health); each route module adds its own paths and schemas (``OPENAPI_PATHS``,
``OPENAPI_SCHEMAS``) and :func:`document` merges them.  Kept in step with the
routes by the schemathesis runs in ``tests/test_api.py`` and
``tests/test_api_routes.py`` (every documented answer is checked against what
the server returns).
"""
from __future__ import annotations

import copy
from typing import Any, Iterable

from qkit.model import STATUSES


def error_response(description: str) -> dict[str, Any]:
    """A documented error answer: one JSON ``Error`` object."""
    schema = {"$ref": "#/components/schemas/Error"}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def json_response(description: str, schema: str) -> dict[str, Any]:
    """A documented JSON answer whose body is the component schema ``schema``."""
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


#: the answers every authenticated route may give
AUTH_ERRORS: dict[str, Any] = {
    "401": error_response("Missing or invalid credentials"),
    "403": error_response("The credentials' role may not do this (a reader's write, a user on an operator route)"),
    "503": error_response("The route's secrets are unset, or the backend is unavailable"),
}


JOB_PROPS: dict[str, Any] = {
    "id": {"type": "integer"},
    "queue": {"type": "string"},
    "type": {"type": "string"},
    "status": {"type": "string", "enum": list(STATUSES)},
    "priority": {"type": "integer"},
    "attempts": {"type": "integer"},
    "max_attempts": {"type": "integer"},
    "error": {"type": ["string", "null"]},
    "idempotency_key": {"type": ["string", "null"]},
    "run_at": {"type": ["string", "null"], "format": "date-time"},
    "created_at": {"type": ["string", "null"], "format": "date-time"},
    "updated_at": {"type": ["string", "null"], "format": "date-time"},
    "started_at": {"type": ["string", "null"], "format": "date-time"},
    "finished_at": {"type": ["string", "null"], "format": "date-time"},
    "owner": {"type": ["string", "null"], "description": "the `sub` of the signed-in user who created the job"},
}

BASE: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "qkit HTTP API", "version": "1",
             "description": "Enqueue and inspect jobs, and trigger worker bursts (docs/http-api.md)."},
    "components": {
        "securitySchemes": {
            "apiToken": {"type": "http", "scheme": "bearer",
                         "description": "QKIT_API_TOKEN (everything), QKIT_API_READ_TOKEN (reads), or a user's JWT "
                                        "verified against QKIT_API_JWKS_URL (their own jobs)"},
            "workerSecret": {"type": "http", "scheme": "bearer", "description": "WORKER_SECRET"},
            "metricsToken": {"type": "http", "scheme": "bearer", "description": "QKIT_METRICS_TOKEN (GET /metrics only)"},
            "qstashSignature": {"type": "apiKey", "in": "header", "name": "Upstash-Signature",
                                "description": "A QStash-signed request (when QStash signing keys are set)"},
        },
        "schemas": {
            "Error": {"type": "object", "required": ["error"],
                      "properties": {"error": {"type": "string"}, "field": {"type": "string"}}},
            "NewJob": {
                "type": "object", "required": ["type", "payload"], "additionalProperties": False,
                "properties": {
                    "type": {"type": "string", "pattern": "^[a-z0-9_.-]{1,64}$"},
                    "payload": {"type": "object", "description": "at most 256 KiB of compact UTF-8 JSON"},
                    "priority": {"type": "integer", "minimum": -1_000_000, "maximum": 1_000_000, "default": 0},
                    "max_attempts": {"type": "integer", "minimum": 1, "maximum": 100, "default": 3},
                    "delay": {"type": "number", "minimum": 0, "maximum": 366 * 24 * 3600, "default": 0},
                    "key": {"type": ["string", "null"], "minLength": 1, "maxLength": 256},
                },
            },
            "Created": {"type": "object", "required": ["id", "status"],
                        "properties": {"id": {"type": "integer"},
                                       "status": {"type": "string", "enum": list(STATUSES)},
                                       "duplicate": {"type": "boolean", "description": "true on a 200: the "
                                                     "idempotency key matched this existing job"}}},
            "JobRow": {"type": "object", "required": ["id", "queue", "type", "status"], "properties": JOB_PROPS},
            "JobList": {"type": "object", "required": ["jobs", "next", "next_before_id"],
                        "properties": {"jobs": {"type": "array", "items": {"$ref": "#/components/schemas/JobRow"}},
                                       "next": {"type": ["string", "null"]},
                                       "next_before_id": {"type": ["integer", "null"]}}},
            "Job": {"type": "object", "required": ["id", "queue", "type", "status", "payload"],
                    "properties": {**JOB_PROPS, "payload": {"type": "object"}, "result": {},
                                   "epoch": {"type": "integer"},
                                   "attempts_detail": {"type": "array", "items": {"type": "object"}}}},
            "BurstRequest": {
                "type": "object", "additionalProperties": False,
                "properties": {"max_jobs": {"type": "integer", "minimum": 1},
                               "max_seconds": {"type": "number", "exclusiveMinimum": 0}},
            },
            "BurstSummary": {
                "type": "object",
                "required": ["worker", "processed", "completed", "retried", "failed", "max_jobs", "max_seconds"],
                "properties": {"worker": {"type": "string"}, "run_id": {"type": ["integer", "null"]},
                               "processed": {"type": "integer"}, "completed": {"type": "integer"},
                               "retried": {"type": "integer"}, "failed": {"type": "integer"},
                               "lost": {"type": "integer"}, "fenced": {"type": "integer"},
                               "released": {"type": "integer"}, "waiting_retry": {"type": "integer"},
                               "next_retry_s": {"type": ["number", "null"]},
                               "seconds": {"type": "number"}, "stopped_by": {"type": "string"},
                               "errors": {"type": "array", "items": {"type": "string"}},
                               "max_jobs": {"type": "integer"}, "max_seconds": {"type": "number"}},
            },
            "Health": {"type": "object", "required": ["status", "checks"],
                       "properties": {"status": {"type": "string", "enum": ["ok", "unavailable"]},
                                      "checks": {"type": "object",
                                                 "additionalProperties": {"type": "string"}}}},
        },
    },
    "paths": {
        "/api/workers": {
            "post": {
                "operationId": "runBurst", "summary": "Run one worker burst",
                "security": [{"workerSecret": []}, {"qstashSignature": []}],
                "requestBody": {"required": False, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/BurstRequest"}}}},
                "responses": {
                    "200": {"description": "The burst's summary (also when jobs failed); budgets are clamped "
                                           "to the server's caps and echoed",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/BurstSummary"}}}},
                    "400": error_response("Body is not a JSON object"),
                    "401": error_response("Missing or invalid secret or signature"),
                    "408": error_response("Body too slow"),
                    "413": error_response("Body too large"),
                    "422": error_response("A field is invalid (named in `field`)"),
                    "500": error_response("Server misconfiguration"),
                    "503": error_response("WORKER_SECRET unset, or the backend is unavailable"),
                },
            },
        },
        "/api/health": {
            "get": {
                "operationId": "health", "summary": "Backend reachability", "security": [],
                "responses": {
                    "200": {"description": "Redis and the ledger answer",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}}},
                    "503": {"description": "A backend does not answer",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}}},
                },
            },
        },
    },
}


def document(parts: Iterable[Any]) -> dict[str, Any]:
    """:data:`BASE` with the paths and schemas of each route module in ``parts`` (in order)."""
    doc = copy.deepcopy(BASE)
    for part in parts:
        for path, operations in getattr(part, "OPENAPI_PATHS", {}).items():
            doc["paths"].setdefault(path, {}).update(copy.deepcopy(operations))
        doc["components"]["schemas"].update(copy.deepcopy(getattr(part, "OPENAPI_SCHEMAS", {})))
    return doc
