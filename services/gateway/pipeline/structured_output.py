"""The request fields that constrain the output (SamplingParams.constraint): OpenAI's response_format,
and SGLang's regex, ebnf and json_schema extensions. Whether the schema, regex or grammar compiles
is the scheduler's to say (it answers INVALID_ARGUMENT, a 400)."""

from __future__ import annotations

import json
from typing import Any

from radixserve.common.sampling import Constraint
from radixserve.gateway.api.errors import bad_request

RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")


def request_constraint(
    *,
    response_format: dict[str, Any] | None = None,
    json_schema: str | dict | None = None,
    regex: str | None = None,
    ebnf: str | None = None,
    param_prefix: str = "",
    structured_outputs=None,
) -> Constraint | None:
    """The constraint of whichever of these the request gave (None: none); more than one is a 400.
    structured_outputs: vLLM's field (protocol.StructuredOutputs), each of its keys one more choice."""
    given: list[tuple[str, str, str]] = []  # (request param, constraint kind, spec)
    if structured_outputs is not None:
        given += _from_structured_outputs(structured_outputs)
    if response_format is not None:
        field_value = _from_response_format(response_format)
        if field_value is not None:
            given.append(("response_format", *field_value))
    if json_schema is not None:
        spec = json_schema if isinstance(json_schema, str) else json.dumps(json_schema)
        given.append((param_prefix + "json_schema", "json_schema", spec))
    if regex is not None:
        given.append((param_prefix + "regex", "regex", regex))
    if ebnf is not None:
        given.append((param_prefix + "ebnf", "ebnf", ebnf))
    if len(given) > 1:
        names = ", ".join(param for param, _, _ in given)
        raise bad_request(f"give at most one output constraint; got {names}", param=given[1][0])
    return Constraint(given[0][1], given[0][2]) if given else None


def _from_response_format(response_format: dict[str, Any]) -> tuple[str, str] | None:
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return "json_object", ""
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, (dict, bool)):
            raise bad_request(
                "response_format json_schema needs json_schema.schema, a JSON schema object",
                param="response_format.json_schema",
                code="invalid_value",
            )
        return "json_schema", json.dumps(schema)
    raise bad_request(
        f"response_format type must be one of {', '.join(RESPONSE_FORMAT_TYPES)}; got {kind!r}",
        param="response_format.type",
        code="invalid_value",
    )


def _from_structured_outputs(so) -> list[tuple[str, str, str]]:
    """vLLM's structured_outputs keys as (param, kind, spec): json a schema, regex, choice one of the
    strings (an EBNF alternation of literals), grammar EBNF, json_object any JSON object."""
    given = []
    if so.json_schema is not None:
        if isinstance(so.json_schema, bool) or not isinstance(so.json_schema, (str, dict)):
            raise bad_request(
                "structured_outputs.json must be a JSON schema (an object or its JSON text)",
                param="structured_outputs.json",
                code="invalid_value",
            )
        spec = so.json_schema if isinstance(so.json_schema, str) else json.dumps(so.json_schema)
        given.append(("structured_outputs.json", "json_schema", spec))
    if so.regex is not None:
        given.append(("structured_outputs.regex", "regex", so.regex))
    if so.choice is not None:
        if not so.choice:
            raise bad_request(
                "structured_outputs.choice must list at least one string",
                param="structured_outputs.choice",
                code="invalid_value",
            )
        literals = " | ".join(json.dumps(c, ensure_ascii=False) for c in so.choice)
        given.append(("structured_outputs.choice", "ebnf", f"root ::= {literals}"))
    if so.grammar is not None:
        given.append(("structured_outputs.grammar", "ebnf", so.grammar))
    if so.json_object:
        given.append(("structured_outputs.json_object", "json_object", ""))
    return given
