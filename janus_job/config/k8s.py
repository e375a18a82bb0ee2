"""Kubernetes grammars for the spec strings that reach a manifest, as pydantic types.

Each type checks a value against the rule the API server (or the container runtime) applies, and
carries the same rule as JSON Schema (pattern, maxLength) so that Helm's values.schema.json refuses
what `janus-job validate` refuses wherever JSON Schema can say it. A refusal is one line naming the
rule and the fix; janus_job.config.load adds the field path.

Sources of the grammars: Kubernetes "Object Names and IDs" (DNS-1123 label and subdomain, DNS-1035
label), "Labels and Selectors" (qualified names, label values), "Annotations" (keys as label keys,
256 KiB in total), the `resource.Quantity` serialization format, "Taints and Tolerations" plus the
API's toleration validation, "Assigning Pods to Nodes" (affinity), and the distribution/reference
grammar of image references.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError

DNS_LABEL_MAX = 63
DNS_SUBDOMAIN_MAX = 253
ANNOTATIONS_TOTAL_MAX = 256 * 1024  # bytes of all keys and values of one object's annotations
IMAGE_NAME_MAX = 255

_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS1123_LABEL = rf"^{_LABEL}$"
DNS1123_SUBDOMAIN = rf"^{_LABEL}(\.{_LABEL})*$"
DNS1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
# the name part of a qualified name (label and annotation keys): <= 63, alphanumeric at both ends
_QNAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
QUALIFIED_NAME = rf"^({_LABEL}(\.{_LABEL})*/)?{_QNAME}$"
LABEL_VALUE = rf"^({_QNAME})?$"
EXTENDED_RESOURCE = rf"^{_LABEL}(\.{_LABEL})*/{_QNAME}$"
# <signedNumber><suffix> without the sign: requests and sizes are never negative
QUANTITY = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[eE][+-]?[0-9]+|[mkMGTPE])?$"
# distribution/reference: [domain[:port]/]path-component(/path-component)*
_DOMAIN_COMPONENT = r"([a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"({_DOMAIN_COMPONENT}(\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:]+\])(:[0-9]+)?"
_PATH_COMPONENT = r"[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*"
IMAGE_REPOSITORY = rf"^({_DOMAIN}/)?{_PATH_COMPONENT}(/{_PATH_COMPONENT})*$"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*([-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
IMAGE_TAG = rf"^({_TAG}|@{_DIGEST}|{_TAG}@{_DIGEST})$"
ABSOLUTE_PATH = r"^(/[A-Za-z0-9._+@=,-]+)+$"
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
# free text that ends up in a manifest (quoted): any printable character, no control characters
PRINTABLE = r"^[^\x00-\x1f\x7f]*$"
TOKEN = r"^[^\x00-\x20\x7f]+$"  # printable, no whitespace (interface and HCA lists, ...)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
STORAGE_SCHEMES = ("s3", "file")
WEIGHTS_SCHEMES = ("s3", "file", "https", "http")


def grammar(
    rule: str,
    fix: str,
    pattern: str | None = None,
    max_length: int | None = None,
    min_length: int = 1,
    check: Callable[[str], str | None] | None = None,
    schema_extra: dict[str, Any] | None = None,
) -> Any:
    """A str type refused with "<rule>" and "<fix>" unless it matches `pattern` within the lengths and
    `check` (returning a reason or None) passes; its JSON Schema states the pattern and lengths, and
    `schema_extra` says what it can of `check` (RE2 patterns: no lookahead)."""
    compiled = re.compile(pattern) if pattern else None

    def validate(value: str) -> str:
        reason = None
        if len(value) < min_length:
            reason = "is empty" if min_length == 1 else f"is shorter than {min_length} characters"
        elif max_length is not None and len(value) > max_length:
            reason = f"is {len(value)} characters, more than {max_length}"
        elif compiled and not compiled.fullmatch(value):
            if _CONTROL.search(value):
                reason = "contains a control character (newline, tab, NUL, ...)"
            else:
                reason = (check(value) if check else None) or "does not match"
        elif check:
            reason = check(value)
        if reason:
            raise PydanticCustomError("k8s_grammar", "{rule}: {reason}", {"rule": rule, "reason": reason, "fix": fix})
        return value

    schema: dict[str, Any] = {"type": "string", "minLength": min_length}
    if pattern:
        schema["pattern"] = pattern
    if max_length is not None:
        schema["maxLength"] = max_length
    schema.update(schema_extra or {})
    return Annotated[str, AfterValidator(validate), WithJsonSchema(schema)]


def grammar_error(reason: str, fix: str) -> PydanticCustomError:
    return PydanticCustomError("k8s_grammar", "{reason}", {"reason": reason, "fix": fix})


# -- object names ---------------------------------------------------------------------------------

DNSLabel = grammar(
    "a DNS-1123 label", "use at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit",
    DNS1123_LABEL, DNS_LABEL_MAX)
DNSSubdomain = grammar(
    "a DNS-1123 subdomain name",
    "use at most 253 lowercase letters, digits, '-' and '.', each dot-separated part starting and ending with a "
    "letter or digit", DNS1123_SUBDOMAIN, DNS_SUBDOMAIN_MAX)
DNS1035Label = grammar(
    "a DNS-1035 label", "use at most 63 lowercase letters, digits and '-', starting with a letter and not ending "
    "with '-'", DNS1035_LABEL, DNS_LABEL_MAX)


def _priority_class(value: str) -> str | None:
    if value.startswith("system-") and value not in ("system-node-critical", "system-cluster-critical"):
        return "the 'system-' prefix is reserved for Kubernetes' own classes"
    return None


PriorityClassName = grammar(
    "a PriorityClass name (DNS-1123 subdomain, 'system-' reserved)",
    "use the name of a PriorityClass your cluster admin created (kubectl get priorityclass)",
    DNS1123_SUBDOMAIN, DNS_SUBDOMAIN_MAX, check=_priority_class,
    schema_extra={"anyOf": [{"enum": ["system-node-critical", "system-cluster-critical"]},
                            {"not": {"pattern": "^system-"}}]})


# -- labels, annotations, node selection ----------------------------------------------------------


def _qualified_name(value: str) -> str | None:
    prefix, _, name = value.rpartition("/")
    if len(prefix) > DNS_SUBDOMAIN_MAX:
        return f"the prefix before '/' is {len(prefix)} characters, more than {DNS_SUBDOMAIN_MAX}"
    if len(name) > DNS_LABEL_MAX:
        return f"the name after the prefix is {len(name)} characters, more than {DNS_LABEL_MAX}"
    return None


_KEY_LENGTHS = {"allOf": [{"pattern": f"^([^/]{{1,{DNS_SUBDOMAIN_MAX}}}/)?[^/]{{1,{DNS_LABEL_MAX}}}$"}]}
_KEY_FIX = ("write [prefix/]name: an optional DNS subdomain prefix (<= 253) and '/', then <= 63 letters, digits, "
            "'-', '_' or '.', starting and ending with a letter or digit")
LabelKey = grammar("a label key (qualified name)", _KEY_FIX, QUALIFIED_NAME,
                   DNS_SUBDOMAIN_MAX + 1 + DNS_LABEL_MAX, check=_qualified_name, schema_extra=_KEY_LENGTHS)
AnnotationKey = grammar("an annotation key (qualified name)", _KEY_FIX, QUALIFIED_NAME,
                        DNS_SUBDOMAIN_MAX + 1 + DNS_LABEL_MAX, check=_qualified_name, schema_extra=_KEY_LENGTHS)
LabelValue = grammar(
    "a label value", "use at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit "
    "(or the empty string)", LABEL_VALUE, DNS_LABEL_MAX, min_length=0)


def annotations_size_problem(annotations: dict[str, str]) -> str | None:
    """The API server's limit on all annotations of one object together, or None."""
    size = sum(len(k.encode()) + len(v.encode()) for k, v in annotations.items())
    if size > ANNOTATIONS_TOTAL_MAX:
        return f"keys and values total {size} bytes, more than the {ANNOTATIONS_TOTAL_MAX} bytes Kubernetes allows"
    return None


def _annotation_map(value: dict[str, str]) -> dict[str, str]:
    problem = annotations_size_problem(value)
    if problem:
        raise PydanticCustomError("k8s_grammar", "annotations: {reason}",
                                  {"reason": problem, "fix": "move large values into a ConfigMap and reference it"})
    return value


AnnotationValue = grammar("an annotation value", "remove control characters other than tab and newline",
                          r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$", ANNOTATIONS_TOTAL_MAX, min_length=0)
Annotations = Annotated[dict[AnnotationKey, AnnotationValue], AfterValidator(_annotation_map)]
NodeSelector = dict[LabelKey, LabelValue]


# -- resources ------------------------------------------------------------------------------------


def quantity_value(text: str) -> Decimal:
    """The number a Kubernetes quantity stands for (`1536Mi`, `1.5`, `500m`, `1e3`)."""
    match = re.fullmatch(QUANTITY, text)
    if not match:
        raise ValueError(f"{text!r} is not a Kubernetes quantity")
    number, suffix = Decimal(match.group(1)), match.group(3) or ""
    binary = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
    decimal = {"m": -1, "": 0, "k": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6}
    if suffix in binary:
        return number * 1024 ** binary[suffix]
    if suffix in decimal:
        return number * Decimal(1000) ** decimal[suffix]
    return number * Decimal(10) ** int(suffix[1:])


def _positive_quantity(value: str) -> str | None:
    try:
        amount = quantity_value(value)
    except (ValueError, InvalidOperation):
        return "does not match"
    if amount <= 0:
        return "is zero"
    if amount >= 2**63:
        return "is larger than 2^63-1, the most a quantity holds"
    return None


Quantity = grammar(
    "a Kubernetes quantity", "write a number with an optional suffix: Ki Mi Gi Ti Pi Ei (powers of 1024), m k M G T "
    "P E (powers of 1000) or an exponent, e.g. '96', '500m', '1500Gi' (quote it in YAML)",
    QUANTITY, 64, check=_positive_quantity,
    schema_extra={"not": {"pattern": r"^(0+(\.0*)?|\.0+)([KMGTPE]i|[eE][+-]?[0-9]+|[mkMGTPE])?$"}})


def _extended_resource(value: str) -> str | None:
    prefix, _, _ = value.partition("/")
    if prefix == "kubernetes.io" or prefix.endswith(".kubernetes.io"):
        return "the kubernetes.io domain is reserved for native resources"
    if value.startswith("requests."):
        return "the 'requests.' prefix is reserved for quotas"
    return _qualified_name(value)


ExtendedResourceName = grammar(
    "an extended resource name (domain/name)",
    "use the device plugin's resource name, e.g. nvidia.com/gpu or rdma/hca_shared_devices_a",
    EXTENDED_RESOURCE, DNS_SUBDOMAIN_MAX + 1 + DNS_LABEL_MAX, check=_extended_resource,
    schema_extra={"not": {"pattern": r"^(([^/]*\.)?kubernetes\.io/|requests\.)"}, **_KEY_LENGTHS})


# -- images ---------------------------------------------------------------------------------------


def _image_repository(value: str) -> str | None:
    if len(value) > IMAGE_NAME_MAX:
        return f"is {len(value)} characters, more than {IMAGE_NAME_MAX}"
    return None


ImageRepository = grammar(
    "an image repository ([registry[:port]/]path)",
    "write it like ghcr.io/org/janus-train: lowercase path parts separated by '/', no tag (that is image.tag)",
    IMAGE_REPOSITORY, IMAGE_NAME_MAX, check=_image_repository)


def _image_tag(value: str) -> str | None:
    _, at, digest = value.partition("@")
    if at and digest.startswith("sha256:") and not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        return "a sha256 digest has exactly 64 lowercase hex digits"
    return None


ImageTag = grammar(
    "an image tag or digest",
    "use a tag of <= 128 letters, digits, '_', '.' or '-' (not starting with '.' or '-'), '@sha256:<64 hex>', "
    "or both as tag@sha256:<64 hex>", IMAGE_TAG, 128 + 1 + 200, check=_image_tag,
    schema_extra={"anyOf": [{"not": {"pattern": "@sha256:"}}, {"pattern": "@sha256:[0-9a-f]{64}$"}]})


# -- paths, environment, free text ----------------------------------------------------------------

# where the chart mounts its own volumes, and what a volume must not hide
CHART_MOUNTS = ("/etc/janus", "/dev/shm", "/var/run/janus/stats", "/tmp", "/home/janus")
# names of the chart's own volumes in a GPU pod: a user volume may not take them
CHART_VOLUMES = ("spec", "dshm", "tmp", "home", "feature-cache", "gpu-stats", "checkpoint-staging", "monitor-tmp")
SYSTEM_DIRS = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/opt/janus", "/proc", "/sbin", "/sys", "/usr",
               "/var/run/secrets")


def _absolute_path(value: str) -> str | None:
    if posixpath.normpath(value) != value or any(part in (".", "..") for part in value.split("/")):
        return f"is not normalised (normalised: {posixpath.normpath(value)!r})"
    return None


AbsolutePath = grammar(
    "an absolute normalised path", "write it like /var/cache/janus-features: '/'-separated parts of letters, digits "
    "and ._+@=,- with no '.', '..', '//' or trailing '/'", ABSOLUTE_PATH, 1024, check=_absolute_path,
    schema_extra={"not": {"pattern": r"/\.\.?(/|$)"}})


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def mount_path_problem(path: str, taken: dict[str, str]) -> str | None:
    """Why a volume at `path` would clash with another mount of the pod ({path: what}) or hide system files."""
    for other, what in taken.items():
        if _overlaps(path, other):
            return f"{path} overlaps {other} ({what}); mount paths of one container must be distinct and not nested"
    for system in SYSTEM_DIRS:
        if path == system or system.startswith(path + "/") or (system in ("/proc", "/sys", "/dev")
                                                               and path.startswith(system + "/")):
            return f"{path} would hide {system} of the image"
    return None


def inside(path: str, mount: str) -> bool:
    """Whether `path` is `mount` or lies below it."""
    return path == mount or path.startswith(mount.rstrip("/") + "/")


EnvVarName = grammar("an environment variable name", "use letters, digits and '_', not starting with a digit",
                     ENV_NAME, 256)
PrintableText = grammar("printable text", "remove control characters (newlines, tabs, NUL)", PRINTABLE, 4096,
                        min_length=0)
Token = grammar("a token without whitespace", "remove spaces and control characters", TOKEN, 256)


# scheme://userinfo@host: credentials written into a URL (https://user:PASS@host, s3://key:secret@bucket)
URL_CREDENTIALS = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@")
CREDENTIALS_REASON = (
    "holds credentials inside the URL (the part before '@'); they would be copied into the ConfigMap, the pods' "
    "environment and log lines (not repeated here): remove them and put them in the Secret named by "
    "features.credentials_secret (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, see manifests/s3-credentials-secret.yaml)"
)


def _no_credentials(value: str) -> str | None:
    return CREDENTIALS_REASON if URL_CREDENTIALS.match(value) else None


def _location(schemes: tuple[str, ...]) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        if "://" not in value:
            return None
        if URL_CREDENTIALS.match(value):
            return CREDENTIALS_REASON
        scheme, _, rest = value.partition("://")
        if scheme not in schemes:
            return f"the pods cannot open {scheme}:// (the image has {', '.join(s + '://' for s in schemes)})"
        if scheme == "s3" and not re.match(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/|$)", rest):
            return "names no valid bucket (3-63 lowercase letters, digits, '.' or '-')"
        if scheme == "file" and not rest.startswith("/"):
            return "a file:// URL needs an absolute path (file:///data/...)"
        return None

    return check


_TEXT = r"[^\x00-\x1f\x7f]"
_URL_PATTERNS = {
    "s3": rf"s3://[a-z0-9][a-z0-9.-]{{1,61}}[a-z0-9](/{_TEXT}*)?",
    "file": rf"file:///{_TEXT}*",
    # no '@' before the path: credentials never sit in a URL (the schema refuses them too)
    "https": rf"https://[^/?#@\x00-\x1f\x7f]+([/?#]{_TEXT}*)?",
    "http": rf"http://[^/?#@\x00-\x1f\x7f]+([/?#]{_TEXT}*)?",
}
# text without "://" (a path), written without lookahead so Helm's RE2 engine takes it
_NO_SCHEME = r"([^:\x00-\x1f\x7f]|:+[^:/\x00-\x1f\x7f]|:+/[^/\x00-\x1f\x7f])*(:+/?)?"


def location(what: str, schemes: tuple[str, ...]) -> Any:
    """A path or URL the pods open; only schemes whose filesystem the image installs."""
    listed = ", ".join(f"{s}://" for s in schemes)
    pattern = "^(" + "|".join([_URL_PATTERNS[s] for s in schemes] + [_NO_SCHEME]) + ")$"
    return grammar(f"{what} (a path or {listed} URL)",
                   f"use one of {listed} or a path mounted in the pods (other object stores need their fsspec "
                   f"package in the image)", pattern, 1024, check=_location(schemes))


StorageLocation = location("a storage location", STORAGE_SCHEMES)
WeightsLocation = location("a file location", WEIGHTS_SCHEMES)
_IPV4 = r"((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
Host = grammar("a host name or IP address", "write a DNS name such as nfs.storage.example or an address such as "
               "10.0.0.5 or fd00::5", rf"^({_LABEL}(\.{_LABEL})*|{_IPV4}|[0-9a-fA-F:]*:[0-9a-fA-F:.]*)$",
               DNS_SUBDOMAIN_MAX)
HttpUrl = grammar("an http(s) URL", "write it like https://minio.example:9000",
                  r"^https?://[^\x00-\x20\x7f/?#@]+([/?#][^\x00-\x20\x7f]*)?$", 2048, check=_no_credentials)


# -- free data ----------------------------------------------------------------------------------------

CONFIG_KEY = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
_CONFIG_KEY = re.compile(CONFIG_KEY)
_TEXT_VALUE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _config_tree(tree: dict[str, Any]) -> dict[str, Any]:
    """Keys of raw config blocks (deepspeed.extra_config) are identifiers, as DeepSpeed's are: Helm's toYaml
    writes nothing at all for a spec with a key of thousands of characters, and the pods would get an empty spec."""
    stack: list[tuple[str, Any]] = [("", tree)]
    while stack:
        where, node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if not _CONFIG_KEY.fullmatch(key):
                    shown = repr(key) if len(key) <= 40 else repr(key[:37]) + "..."
                    raise grammar_error(f"key {shown}{' under ' + where if where else ''} is not a config key",
                                         "use letters, digits and '_' (at most 128), as DeepSpeed's keys are")
                stack.append((f"{where}.{key}" if where else key, value))
        elif isinstance(node, list):
            stack.extend((f"{where}[{i}]", item) for i, item in enumerate(node))
        elif isinstance(node, str) and _TEXT_VALUE.search(node):
            raise grammar_error(f"{where} contains a control character", "remove it")
    return tree


ConfigTree = Annotated[dict[str, Any], AfterValidator(_config_tree), WithJsonSchema(
    {"type": "object", "propertyNames": {"pattern": CONFIG_KEY}, "additionalProperties": True})]


# -- scheduling -----------------------------------------------------------------------------------


class _K8s(BaseModel):
    """Kubernetes objects keep their API field names (camelCase) so they are copied into the pod as written."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Toleration(_K8s):
    model_config = ConfigDict(json_schema_extra={"allOf": [
        {"if": {"required": ["operator"], "properties": {"operator": {"const": "Exists"}}},
         "then": {"properties": {"value": {"anyOf": [{"maxLength": 0}, {"type": "null"}]}}}},
        {"if": {"not": {"required": ["key"]}}, "then": {"required": ["operator"],
                                                         "properties": {"operator": {"const": "Exists"}}}},
        {"if": {"required": ["tolerationSeconds"], "properties": {"tolerationSeconds": {"type": "integer"}}},
         "then": {"required": ["effect"], "properties": {"effect": {"const": "NoExecute"}}}},
    ]})

    key: LabelKey | None = Field(None, description="Taint key; empty matches every key (operator Exists).")
    operator: Literal["Exists", "Equal"] | None = Field(None, description="Exists or Equal (default).")
    value: LabelValue | None = Field(None, description="Taint value (operator Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect; empty matches every effect.")
    tolerationSeconds: int | None = Field(None, ge=0, le=2**31 - 1,
                                          description="Seconds a NoExecute taint is tolerated.")

    @model_validator(mode="after")
    def _rules(self) -> Toleration:
        if self.operator == "Exists" and self.value:
            raise grammar_error("value must be empty with operator Exists", "remove value or use operator: Equal")
        if not self.key and self.operator != "Exists":
            raise grammar_error("an empty key needs operator Exists (it matches every taint)",
                                 "set key, or operator: Exists")
        if self.tolerationSeconds is not None and self.effect != "NoExecute":
            raise grammar_error("tolerationSeconds needs effect NoExecute",
                                 "set effect: NoExecute or remove tolerationSeconds")
        return self


_REQUIREMENT_RULES = {"allOf": [
    {"if": {"properties": {"operator": {"enum": ["In", "NotIn"]}}},
     "then": {"required": ["values"], "properties": {"values": {"type": "array", "minItems": 1}}}},
    {"if": {"properties": {"operator": {"enum": ["Exists", "DoesNotExist"]}}},
     "then": {"properties": {"values": {"anyOf": [{"type": "null"}, {"maxItems": 0}]}}}},
    {"if": {"properties": {"operator": {"enum": ["Gt", "Lt"]}}},
     "then": {"required": ["values"], "properties": {"values": {
         "type": "array", "minItems": 1, "maxItems": 1, "items": {"pattern": "^-?[0-9]+$"}}}}},
]}


class NodeSelectorRequirement(_K8s):
    model_config = ConfigDict(json_schema_extra=_REQUIREMENT_RULES)

    key: LabelKey
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]
    values: list[LabelValue] | None = None

    @model_validator(mode="after")
    def _rules(self) -> NodeSelectorRequirement:
        values = self.values or []
        if self.operator in ("In", "NotIn") and not values:
            raise grammar_error(f"operator {self.operator} needs values", "list at least one value")
        if self.operator in ("Exists", "DoesNotExist") and values:
            raise grammar_error(f"operator {self.operator} takes no values", "remove values")
        if self.operator in ("Gt", "Lt") and (len(values) != 1 or not re.fullmatch(r"-?[0-9]+", values[0])):
            raise grammar_error(f"operator {self.operator} needs exactly one integer value", "give one integer")
        return self


class NodeSelectorTerm(_K8s):
    matchExpressions: list[NodeSelectorRequirement] | None = None
    matchFields: list[NodeSelectorRequirement] | None = None


class NodeSelectorSpec(_K8s):
    nodeSelectorTerms: list[NodeSelectorTerm] = Field(..., min_length=1)


class PreferredSchedulingTerm(_K8s):
    weight: int = Field(..., ge=1, le=100)
    preference: NodeSelectorTerm


class NodeAffinity(_K8s):
    requiredDuringSchedulingIgnoredDuringExecution: NodeSelectorSpec | None = None
    preferredDuringSchedulingIgnoredDuringExecution: list[PreferredSchedulingTerm] | None = None


class LabelSelectorRequirement(_K8s):
    model_config = ConfigDict(json_schema_extra=_REQUIREMENT_RULES)

    key: LabelKey
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[LabelValue] | None = None

    @model_validator(mode="after")
    def _rules(self) -> LabelSelectorRequirement:
        values = self.values or []
        if self.operator in ("In", "NotIn") and not values:
            raise grammar_error(f"operator {self.operator} needs values", "list at least one value")
        if self.operator in ("Exists", "DoesNotExist") and values:
            raise grammar_error(f"operator {self.operator} takes no values", "remove values")
        return self


class LabelSelector(_K8s):
    matchLabels: dict[LabelKey, LabelValue] | None = None
    matchExpressions: list[LabelSelectorRequirement] | None = None


class PodAffinityTerm(_K8s):
    labelSelector: LabelSelector | None = None
    namespaceSelector: LabelSelector | None = None
    namespaces: list[DNSLabel] | None = None
    topologyKey: LabelKey
    matchLabelKeys: list[LabelKey] | None = None
    mismatchLabelKeys: list[LabelKey] | None = None


class WeightedPodAffinityTerm(_K8s):
    weight: int = Field(..., ge=1, le=100)
    podAffinityTerm: PodAffinityTerm


class PodAffinity(_K8s):
    requiredDuringSchedulingIgnoredDuringExecution: list[PodAffinityTerm] | None = None
    preferredDuringSchedulingIgnoredDuringExecution: list[WeightedPodAffinityTerm] | None = None


class Affinity(_K8s):
    """A pod's affinity as the Kubernetes API writes it (nodeAffinity, podAffinity, podAntiAffinity)."""

    nodeAffinity: NodeAffinity | None = None
    podAffinity: PodAffinity | None = None
    podAntiAffinity: PodAffinity | None = None


UNIQUE = Field(json_schema_extra={"uniqueItems": True})


def unique(what: str) -> Any:
    """A list validator refusing repeated items."""

    def check(items: list[Any]) -> list[Any]:  # JSON Schema: uniqueItems (see UNIQUE)
        seen = set()
        for item in items:
            if item in seen:
                raise grammar_error(f"{what} {item!r} is listed twice", "list each once")
            seen.add(item)
        return items

    return AfterValidator(check)
