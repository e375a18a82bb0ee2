"""Loading a job spec: file -> strict YAML reader -> structure (pydantic) -> rules between fields -> DeepSpeed.

`load_spec(path)` / `validate_spec(data)` return a JobSpec or raise one JobError that lists every
problem with its field and fix; `read_spec_yaml(path)` is the reader on its own.

A job spec is small, hand-written YAML that also reaches Helm, so anything a reader could take two
ways is refused instead of guessed: files over 1 MiB, encodings other than UTF-8 (UTF-16, Latin-1,
binary), more or fewer than one YAML document, anchors and aliases (no alias bombs), merge keys,
explicit tags, nesting deeper than 32 levels, duplicate keys, non-text keys, and NaN/Inf numbers.
Dates stay text (as Helm reads them), and `2e-5` is a number (YAML 1.2, as Helm's toYaml writes it).
Every error names the file and, where there is one, the field and its line.
"""

from __future__ import annotations

import difflib
import math
import re
from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import BaseModel, ValidationError

from janus_job.config import k8s
from janus_job.config.deepspeed import deepspeed_problems
from janus_job.config.rules import spec_problems
from janus_job.config.spec import JobSpec
from janus_job.errors import JobError, Problem

# -- the strict reader ----------------------------------------------------------------------------

MAX_BYTES = 1024 * 1024
MAX_DEPTH = 32
MAX_NODES = 100_000
_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "map", "seq")}
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_BASE = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser where PyYAML was built with it


class SpecLoader(_BASE):  # type: ignore[valid-type,misc]
    """SafeLoader without timestamps (Helm keeps `2024-01-01` as text) and with YAML 1.2 floats."""

    yaml_implicit_resolvers: ClassVar[dict] = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }


SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _line(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _decode(source: str, raw: bytes) -> str:
    fix = "fix: save the file as UTF-8 text"
    if raw.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        raise JobError(f"{source}: the file is UTF-32 text; {fix}")
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise JobError(f"{source}: the file is UTF-16 text; {fix}")
    if b"\x00" in raw:
        raise JobError(f"{source}: the file holds NUL bytes (a binary file, or UTF-16 without a byte order mark); "
                       f"{fix}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise JobError(f"{source}: line {line}: byte 0x{raw[err.start]:02x} is not UTF-8 (Latin-1 or another "
                       f"8-bit encoding?); {fix}") from None
    text = text.removeprefix("\ufeff")
    bad = _CONTROL.search(text)
    if bad:
        raise JobError(f"{source}: line {_line(text, bad.start())}: control character {bad.group()!r} in the file; "
                       "fix: remove it (a job spec is plain text)")
    return text


def _yaml_error(source: str, err: yaml.YAMLError) -> JobError:
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(err, "problem", None) or str(err).replace("\n", " ")
    return JobError(f"{source}: not valid YAML{where}: {problem}; fix: correct the YAML syntax there")


def _scan(source: str, text: str) -> None:
    """One pass over the parse events: document count, anchors/aliases, depth and size limits."""
    documents = depth = nodes = 0
    for event in yaml.parse(text, Loader=SpecLoader):
        line = event.start_mark.line + 1
        if isinstance(event, yaml.DocumentStartEvent):
            documents += 1
            if documents > 1:
                raise JobError(f"{source}: line {line}: a second YAML document ('---'); a job spec is exactly one "
                               "document; fix: put each job in its own file")
        elif isinstance(event, yaml.AliasEvent):
            raise JobError(f"{source}: line {line}: alias *{event.anchor} -- anchors and aliases are not allowed in a "
                           "job spec; fix: write the value out")
        elif isinstance(event, yaml.NodeEvent):
            nodes += 1
            if event.anchor is not None:
                raise JobError(f"{source}: line {line}: anchor &{event.anchor} -- anchors and aliases are not allowed "
                               "in a job spec; fix: write the value out")
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    raise JobError(f"{source}: line {line}: nested deeper than {MAX_DEPTH} levels; fix: flatten it "
                                   "(no field of a job spec is that deep)")
            if nodes > MAX_NODES:
                raise JobError(f"{source}: more than {MAX_NODES} YAML values; fix: a job spec is a few hundred lines")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    if documents == 0:
        raise JobError(f"{source}: the file is empty; fix: write a job spec (see examples/minimal.yaml)")


def _where(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _convert(source: str, loader: SpecLoader, node: yaml.Node, path: tuple[Any, ...]) -> Any:
    line = node.start_mark.line + 1
    if node.tag not in _TAGS:
        raise JobError(f"{source}: {_where(path)} (line {line}): YAML tag {node.tag} is not allowed; "
                       "fix: remove the tag (write plain values)")
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                raise JobError(f"{source}: {_where(path)} (line {key_line}): keys must be plain text (no merge keys "
                               "'<<' or complex keys); fix: write each key out")
            key = loader.construct_object(key_node)
            if not isinstance(key, str):
                raise JobError(f"{source}: {_where(path)} (line {key_line}): key {key!r} is not text; "
                               f"fix: quote it ('{key}')")
            if key in out:
                raise JobError(f"{source}: {_where((*path, key))} (line {key_line}): set twice (first at line "
                               f"{first_line[key]}); fix: keep one")
            first_line[key] = key_line
            out[key] = _convert(source, loader, value_node, (*path, key))
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_convert(source, loader, item, (*path, i)) for i, item in enumerate(node.value)]
    value = loader.construct_object(node)
    if isinstance(value, float) and not math.isfinite(value):
        raise JobError(f"{source}: {_where(path)} (line {line}): {node.value} is not a finite number; "
                       "fix: write a finite number")
    return value


def read_spec_yaml(path: str | Path) -> Any:
    """The data of a job spec file, read strictly (see the module docstring); JobError names file and field."""
    p = Path(path)
    source = str(p)
    try:
        size = p.stat().st_size
        if not p.is_file():
            raise JobError(f"{source}: not a file; fix: pass the path of your job YAML (see examples/)")
        if size > MAX_BYTES:
            raise JobError(f"{source}: {size} bytes, more than the {MAX_BYTES} a job spec may have; "
                           "fix: a job spec is a few hundred lines -- keep data out of it")
        raw = p.read_bytes()
    except FileNotFoundError:
        raise JobError(f"{source}: no such job spec file; fix: pass the path of your job YAML (see examples/)") \
            from None
    except OSError as err:
        raise JobError(f"{source}: cannot read the job spec ({err.strerror})") from None
    text = _decode(source, raw)
    try:
        _scan(source, text)
        loader = SpecLoader(text)
        try:
            node = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.YAMLError as err:
        raise _yaml_error(source, err) from None
    if node is None:
        raise JobError(f"{source}: the file holds no values; fix: write a job spec (see examples/minimal.yaml)")
    try:
        data = _convert(source, loader, node, ())
    except yaml.YAMLError as err:
        raise _yaml_error(source, err) from None
    if data is None:
        raise JobError(f"{source}: the file holds no values; fix: write a job spec (see examples/minimal.yaml)")
    return data


# -- structure and rules --------------------------------------------------------------------------
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
    "multiple_of": "use a multiple of {multiple_of}",
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
            desc = (
                field.model_fields[str(loc[-1])].description if field and str(loc[-1]) in field.model_fields else None
            )
            problems.append(Problem(path, "required but missing", f"add it ({desc})" if desc else "add it"))
            continue
        got = e.get("input")
        shown = repr(got) if len(repr(got)) <= 80 else repr(got)[:76] + "...'"
        got_text = "" if isinstance(got, (dict, list)) else f" (got {shown})"
        if isinstance(got, str) and k8s.URL_CREDENTIALS.match(got):
            got_text = ""  # never repeat credentials written into a URL
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
        raise JobError(
            f"{source}: the job spec must be a YAML mapping with keys name, model, data, features, training, ..."
        )
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
    return validate_spec(read_spec_yaml(path), str(path))
