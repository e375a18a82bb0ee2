"""Loading a job spec: YAML -> structure (pydantic) -> rules between fields -> DeepSpeed rules.

`load_spec(path)` / `validate_spec(data)` return a JobSpec or raise one JobError that lists every
problem with its field and fix.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from janus_job.config.deepspeed import deepspeed_problems
from janus_job.config.rules import spec_problems
from janus_job.config.spec import JobSpec
from janus_job.errors import JobError, Problem


def _model_at(path: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = JobSpec
    for part in path:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return model


_FIXES = {
    "greater_than_equal": "use a value >= {ge}",
    "greater_than": "use a value > {gt}",
    "less_than_equal": "use a value <= {le}",
    "less_than": "use a value < {lt}",
    "string_too_long": "use at most {max_length} characters",
    "string_too_short": "use at least {min_length} character(s)",
    "string_pattern_mismatch": "match the pattern {pattern}",
    "literal_error": "use {expected}",
    "int_parsing": "use a whole number",
    "int_type": "use a whole number, unquoted",
    "int_from_float": "use a whole number",
    "float_parsing": "use a number",
    "float_type": "use a number (finite, unquoted)",
    "finite_number": "use a finite number",
    "bool_parsing": "use true or false",
    "bool_type": "use true or false, unquoted",
    "k8s_grammar": "{fix}",
    "too_long": "use at most {max_length} items",
    "string_type": "use a string (quote it in YAML)",
    "dict_type": "use a mapping (key: value lines)",
    "model_type": "use a mapping (key: value lines)",
    "list_type": "use a list",
}


def _structural_problems(err: ValidationError) -> list[Problem]:
    problems = []
    for e in err.errors():
        loc = tuple(e["loc"])
        path = ".".join(str(p) for p in loc) or "(top level)"
        kind = e["type"]
        if kind == "extra_forbidden":
            parent = _model_at(loc[:-1])
            valid = sorted(parent.model_fields) if parent else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            prefix = ".".join(str(p) for p in loc[:-1])
            fix = (f"did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close
                   else f"remove it; valid keys here: {', '.join(valid)}")
            problems.append(Problem(path, "unknown key", fix))
            continue
        if kind == "missing":
            field = _model_at(loc[:-1])
            desc = field.model_fields[str(loc[-1])].description if field and str(loc[-1]) in field.model_fields else None
            problems.append(Problem(path, "required but missing", f"add it ({desc})" if desc else "add it"))
            continue
        got = e.get("input")
        shown = repr(got) if len(repr(got)) <= 80 else repr(got)[:76] + "...'"
        got_text = "" if isinstance(got, (dict, list)) else f" (got {shown})"
        if len(loc) >= 2 and loc[-1] == "[key]":  # a map key outside its grammar: name the map and the key
            path, got_text, loc = ".".join(str(p) for p in loc[:-2]), "", loc[:-1]
            e = {**e, "msg": f"key {loc[-1]!r}: {e['msg']}"}
        field_model = _model_at(loc[:-1])
        desc = None
        if field_model and str(loc[-1]) in field_model.model_fields:
            desc = field_model.model_fields[str(loc[-1])].description
        fix = _FIXES.get(kind, "set {path} to a valid value").format(path=path, **e.get("ctx", {}))
        if kind == "string_pattern_mismatch" and loc == ("name",):
            fix = "use lowercase letters, digits and '-', starting with a letter and not ending with '-'"
        if desc:
            fix += f" -- {desc}"
        problems.append(Problem(path, f"{e['msg']}{got_text}", fix))
    return problems


def _format(source: str, problems: list[Problem]) -> str:
    n = len(problems)
    return f"{source}: {n} problem{'s' if n != 1 else ''} in the job spec\n" + "\n".join(str(p) for p in problems)


def validate_spec(data: Any, source: str = "job spec") -> JobSpec:
    """Structure, cross-field rules and the DeepSpeed rules; JobError lists every problem."""
    if not isinstance(data, dict):
        raise JobError(f"{source}: the job spec must be a YAML mapping with keys name, model, data, features, training, ...")
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as err:
        raise JobError(_format(source, _structural_problems(err))) from None
    problems = spec_problems(spec) + deepspeed_problems(spec)
    if problems:
        raise JobError(_format(source, problems))
    return spec


def load_spec(path: str | Path) -> JobSpec:
    """Reads and validates a job spec YAML file (also the Helm values / the pod's ConfigMap)."""
    from janus_job.spec_yaml import read_spec_yaml

    return validate_spec(read_spec_yaml(path), str(path))
