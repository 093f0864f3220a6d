"""GitHub's OpenAPI description as a request/response validator for the API stand-in.

OpenAPI 3.0 schemas are JSON Schema draft 4 plus a few keywords; `nullable: true` becomes a
`null` type, OpenAPI-only keywords are dropped, and `$ref`s resolve against the description's
components. Formats `date-time` and `uri` are checked.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from jsonschema import Draft4Validator, FormatChecker
from referencing import Registry
from referencing.jsonschema import DRAFT4

SUBSET = Path(__file__).resolve().parents[1] / "data" / "github" / "openapi-subset.json"
_DOCUMENT = "openapi.json"
_DROP = {"nullable", "example", "examples", "discriminator", "xml", "externalDocs",
         "deprecated", "readOnly", "writeOnly"}


def to_json_schema(schema: Any) -> Any:
    """One OpenAPI 3.0 schema object as JSON Schema (draft 4)."""
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {name: to_json_schema(s) for name, s in value.items()}
        elif key in ("items", "additionalProperties", "not"):
            out[key] = to_json_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [to_json_schema(s) for s in value]
        elif key == "$ref":
            out[key] = _DOCUMENT + value
        elif key in _DROP or key.startswith("x-"):
            continue
        else:
            out[key] = value
    if schema.get("nullable"):
        if isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
            if "enum" in out:
                out["enum"] = [*out["enum"], None]
        else:
            out = {"anyOf": [out, {"type": "null"}]}
    return out


def _format_checker() -> FormatChecker:
    checker = FormatChecker()

    @checker.checks("date-time", raises=ValueError)
    def _date_time(value: object) -> bool:
        if not isinstance(value, str):
            return True
        if not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", value):
            return False
        datetime.fromisoformat(value.replace("Z", "+00:00"))
        return True

    @checker.checks("uri")
    def _uri(value: object) -> bool:
        return not isinstance(value, str) or re.match(r"^[a-z][a-z0-9+.-]*:", value) is not None

    return checker


@dataclass(frozen=True)
class Operation:
    operation_id: str
    method: str
    template: str
    pattern: re.Pattern[str]
    spec: dict[str, Any]

    def parameters(self, where: str) -> dict[str, dict[str, Any]]:
        return {p["name"]: p for p in self.spec.get("parameters", []) if p["in"] == where}


class OpenAPI:
    def __init__(self, path: Path = SUBSET) -> None:
        self.document = json.loads(Path(path).read_text(encoding="utf-8"))
        components = self.document["components"]
        self._parameters = components.get("parameters", {})
        self.examples = {k: v["value"] for k, v in components.get("examples", {}).items()}
        schemas = {name: to_json_schema(s) for name, s in components["schemas"].items()}
        resource = DRAFT4.create_resource({"components": {"schemas": schemas}})
        self._registry = Registry().with_resource(_DOCUMENT, resource)
        self._formats = _format_checker()
        self.operations: list[Operation] = []
        for template, item in self.document["paths"].items():
            for method, spec in item.items():
                spec = {**spec, "parameters": [self._deref(p) for p in spec.get("parameters",
                                                                                  [])]}
                regex = re.sub(r"\\\{[^}]+\\\}", "([^/]+)", re.escape(template))
                self.operations.append(Operation(spec["operationId"], method.upper(), template,
                                                 re.compile(f"^{regex}$"), spec))

    def _deref(self, node: dict[str, Any]) -> dict[str, Any]:
        ref = node.get("$ref")
        return self._parameters[ref.rsplit("/", 1)[1]] if ref else node

    def match(self, method: str, path: str) -> tuple[Operation, dict[str, str]] | None:
        for op in self.operations:
            if op.method != method:
                continue
            found = op.pattern.match(path)
            if found:
                names = re.findall(r"\{([^}]+)\}", op.template)
                return op, dict(zip(names, found.groups(), strict=True))
        return None

    def parameter_errors(self, op: Operation, path_params: dict[str, str],
                         query: dict[str, str]) -> list[str]:
        errors = []
        for where, values in (("path", path_params), ("query", query)):
            declared = op.parameters(where)
            for name, raw in values.items():
                if name not in declared:
                    errors.append(f"{where} parameter {name!r} is not defined for "
                                  f"{op.operation_id}")
                    continue
                errors += [f"{where} parameter {name}: {e}" for e in
                           self._errors(declared[name]["schema"], _typed(raw, declared[name]))]
            errors += [f"required {where} parameter {name!r} missing"
                       for name, p in declared.items() if p.get("required") and name not in values]
        return errors

    def request_errors(self, op: Operation, body: Any) -> list[str]:
        request = op.spec.get("requestBody")
        if request is None:
            return [] if body is None else [f"{op.operation_id} takes no request body"]
        if body is None:
            return [f"{op.operation_id} needs a JSON body"] if request.get("required") else []
        schema = request["content"]["application/json"]["schema"]
        return self._errors(schema, body)

    def response_errors(self, op: Operation, status: int, body: Any) -> list[str]:
        response = op.spec["responses"].get(str(status))
        if response is None:
            return [f"{op.operation_id} does not document status {status}"]
        content = (response.get("content") or {}).get("application/json")
        if content is None:
            return []
        return self._errors(content["schema"], body)

    def schema(self, name: str) -> dict[str, Any]:
        return {"$ref": f"{_DOCUMENT}#/components/schemas/{name}"}

    def errors_for(self, name: str, instance: Any) -> list[str]:
        return self._errors(self.schema(name), instance, converted=True)

    def _errors(self, schema: dict[str, Any], instance: Any, *,
                converted: bool = False) -> list[str]:
        json_schema = schema if converted else to_json_schema(schema)
        validator = Draft4Validator(json_schema, registry=self._registry,
                                    format_checker=self._formats)
        return [f"{'/'.join(str(p) for p in e.absolute_path) or '(body)'}: {e.message[:300]}"
                for e in validator.iter_errors(instance)]


def _typed(raw: str, parameter: dict[str, Any]) -> Any:
    if parameter.get("schema", {}).get("type") == "integer":
        try:
            return int(raw)
        except ValueError:
            return raw
    return raw
