"""The OpenAPI 3.1 document of the API, served at ``GET /api/openapi.json``.

Kept in step with the routes by the schemathesis test in ``tests/test_api.py``
(every documented answer is checked against what the server returns).
"""
from __future__ import annotations

from typing import Any

from qkit.api.bodies import DEFAULT_LIST_LIMIT, MAX_ID, MAX_LIST_LIMIT
from qkit.model import STATUSES


def _error_response(description: str) -> dict[str, Any]:
    schema = {"$ref": "#/components/schemas/Error"}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_JOB_PROPS: dict[str, Any] = {
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
}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "qkit HTTP API", "version": "1",
             "description": "Enqueue and inspect jobs, and trigger worker bursts (docs/http-api.md)."},
    "components": {
        "securitySchemes": {
            "apiToken": {"type": "http", "scheme": "bearer", "description": "QKIT_API_TOKEN"},
            "workerSecret": {"type": "http", "scheme": "bearer", "description": "WORKER_SECRET"},
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
                                       "status": {"type": "string", "enum": list(STATUSES)}}},
            "JobRow": {"type": "object", "required": ["id", "queue", "type", "status"], "properties": _JOB_PROPS},
            "JobList": {"type": "object", "required": ["jobs", "next", "next_before_id"],
                        "properties": {"jobs": {"type": "array", "items": {"$ref": "#/components/schemas/JobRow"}},
                                       "next": {"type": ["string", "null"]},
                                       "next_before_id": {"type": ["integer", "null"]}}},
            "Job": {"type": "object", "required": ["id", "queue", "type", "status", "payload"],
                    "properties": {**_JOB_PROPS, "payload": {"type": "object"}, "result": {},
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
        "/api/jobs": {
            "post": {
                "operationId": "enqueue", "summary": "Enqueue one job",
                "security": [{"apiToken": []}],
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/NewJob"}}}},
                "responses": {
                    "201": {"description": "Enqueued (or the existing job holding the idempotency key)",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Created"}}}},
                    "400": _error_response("Body is not a JSON object"),
                    "401": _error_response("Missing or invalid token"),
                    "408": _error_response("Body too slow"),
                    "413": _error_response("Body or payload too large"),
                    "422": _error_response("A field is invalid (named in `field`)"),
                    "503": _error_response("QKIT_API_TOKEN unset, or the backend is unavailable"),
                },
            },
            "get": {
                "operationId": "listJobs", "summary": "List jobs, newest first",
                "security": [{"apiToken": []}],
                "parameters": [
                    {"name": "status", "in": "query", "schema": {"type": "string", "enum": list(STATUSES)}},
                    {"name": "type", "in": "query", "schema": {"type": "string", "pattern": "^[a-z0-9_.-]{1,64}$"}},
                    {"name": "limit", "in": "query",
                     "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT,
                                "default": DEFAULT_LIST_LIMIT}},
                    {"name": "before_id", "in": "query",
                     "schema": {"type": "integer", "minimum": 1, "maximum": MAX_ID}},
                ],
                "responses": {
                    "200": {"description": "A page of jobs (payload and result omitted); `next` links the next page",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobList"}}}},
                    "401": _error_response("Missing or invalid token"),
                    "422": _error_response("A query parameter is invalid (named in `field`)"),
                    "503": _error_response("QKIT_API_TOKEN unset, or the backend is unavailable"),
                },
            },
        },
        "/api/jobs/{id}": {
            "get": {
                "operationId": "getJob", "summary": "One job with its attempts",
                "security": [{"apiToken": []}],
                "parameters": [{"name": "id", "in": "path", "required": True,
                                "schema": {"type": "integer", "minimum": 1}}],
                "responses": {
                    "200": {"description": "The job",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Job"}}}},
                    "401": _error_response("Missing or invalid token"),
                    "404": _error_response("No such job in this queue"),
                    "503": _error_response("QKIT_API_TOKEN unset, or the backend is unavailable"),
                },
            },
        },
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
                    "400": _error_response("Body is not a JSON object"),
                    "401": _error_response("Missing or invalid secret or signature"),
                    "408": _error_response("Body too slow"),
                    "413": _error_response("Body too large"),
                    "422": _error_response("A field is invalid (named in `field`)"),
                    "500": _error_response("Server misconfiguration"),
                    "503": _error_response("WORKER_SECRET unset, or the backend is unavailable"),
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
