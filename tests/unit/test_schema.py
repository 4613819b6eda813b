"""The CRD's OpenAPI schema (crds/workorder.yaml) and the typed model (model.py) agree field for
field: the same names, types, enums and required fields, for spec and for every status field."""

from __future__ import annotations

import datetime as dt
import enum
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from workorder_operator import model

CRD = Path(__file__).resolve().parents[2] / "crds" / "workorder.yaml"


def schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    return dict(version["schema"]["openAPIV3Schema"]["properties"])


def _strip_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        assert len(args) == 1, annotation
        return args[0]
    return annotation


def mismatches(prop: dict[str, Any], annotation: Any, where: str) -> list[str]:
    """What differs between one schema property and one model annotation."""
    t = _strip_optional(annotation)
    kind = prop.get("type")
    if kind == "string":
        if prop.get("format") == "date-time":
            return [] if t is dt.datetime else [f"{where}: date-time in the CRD, {t} in the model"]
        if "enum" in prop:
            if not (isinstance(t, type) and issubclass(t, enum.Enum)):
                return [f"{where}: an enum in the CRD, {t} in the model"]
            values = {str(m.value) for m in t}
            return [] if values == set(prop["enum"]) else [f"{where}: enum {prop['enum']} vs {sorted(values)}"]
        return [] if t is str else [f"{where}: string in the CRD, {t} in the model"]
    if kind == "integer":
        return [] if t is int else [f"{where}: integer in the CRD, {t} in the model"]
    if kind == "array":
        if typing.get_origin(t) is not list:
            return [f"{where}: array in the CRD, {t} in the model"]
        return mismatches(prop["items"], typing.get_args(t)[0], f"{where}[]")
    if kind == "object":
        if isinstance(t, type) and issubclass(t, BaseModel):
            return compare(prop, t, where)
        if typing.get_origin(t) is dict and "additionalProperties" in prop:
            return mismatches(prop["additionalProperties"], typing.get_args(t)[1], f"{where}{{}}")
        return [f"{where}: object in the CRD, {t} in the model"]
    return [f"{where}: type {kind!r} not understood by this test"]


def compare(obj: dict[str, Any], cls: type[BaseModel], where: str) -> list[str]:
    props: dict[str, Any] = obj.get("properties", {})
    fields = {f.alias or name: f for name, f in cls.model_fields.items()}
    problems = [f"{where}.{p}: in the CRD, not in {cls.__name__}" for p in props.keys() - fields.keys()]
    problems += [f"{where}.{p}: in {cls.__name__}, not in the CRD" for p in fields.keys() - props.keys()]
    required = set(obj.get("required", []))
    for name in props.keys() & fields.keys():
        problems += mismatches(props[name], fields[name].annotation, f"{where}.{name}")
        if (name in required) != fields[name].is_required():
            problems.append(f"{where}.{name}: required in {'the CRD' if name in required else cls.__name__} only")
    return problems


@pytest.mark.parametrize(("part", "cls"), [("spec", model.Spec), ("status", model.Status)])
def test_the_crd_schema_and_the_model_agree_field_for_field(part: str, cls: type[BaseModel]) -> None:
    assert compare(schema()[part], cls, part) == []


def test_the_comparison_sees_a_difference() -> None:
    """The check itself: a field missing on either side, or of another type, is reported."""

    class Short(model.Status):
        extra_field: int = 0

    status = schema()["status"]
    assert "status.extraField: in Short, not in the CRD" in compare(status, Short, "status")
    narrowed = {**status, "properties": {**status["properties"], "attempt": {"type": "string"}}}
    assert any("status.attempt" in p for p in compare(narrowed, model.Status, "status"))
