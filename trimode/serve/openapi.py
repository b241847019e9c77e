"""The OpenAPI document: FastAPI's, plus the request bodies as `protocol.parse_body` validates them (with this
server's model and routes) and the error body. The routes read their bodies themselves (strict, off the event
loop), so FastAPI alone would describe none of them; clients and the fuzz tests read this one."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from trimode.serve.plan import ServerConfig
from trimode.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EditRequest,
    ResponsesRequest,
    TokenizeRequest,
)

ERROR_RESPONSES: dict = {status: {"description": what, "content": {"application/json": {"schema": {
    "$ref": "#/components/schemas/ErrorBody"}}}} for status, what in (
    (400, "invalid request"), (401, "missing or wrong API key"), (403, "mode not allowed on the route"),
    (404, "unknown model or route"), (413, "request body too large"), (415, "the body is not JSON"),
    (421, "host name not served"), (429, "the engine is full"), (500, "internal error"),
    (503, "engine stopped or out of memory"))}
BODIES = (("/v1/completions", CompletionRequest), ("/v1/chat/completions", ChatCompletionRequest),
          ("/v1/responses", ResponsesRequest), ("/v1/edits", EditRequest), ("/tokenize", TokenizeRequest),
          ("/detokenize", DetokenizeRequest))


def openapi_schema(app: FastAPI, config: ServerConfig) -> dict:
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components["ErrorBody"] = {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["message", "type", "param", "code"], "properties": {
                "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]}}}}}
        for path, model in BODIES:
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            body["properties"]["model"] = {"type": "string", "enum": [config.model_name]}
            if config.policy is not None and "route" in body["properties"]:
                body["properties"]["route"] = {"anyOf": [{"enum": list(config.policy.routes)}, {"type": "null"}]}
            components[model.__name__] = body
            schema["paths"][path]["post"]["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
        app.openapi_schema = schema
    return app.openapi_schema
