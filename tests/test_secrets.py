"""Nothing secret in rendered output: credentials only reach pods through Secret references."""

from __future__ import annotations

import re
from pathlib import Path

import helm_python
import pytest
import yaml

from janus_job.deploy.render import render_chart

ROOT = Path(__file__).resolve().parent.parent
VALUE_FILES = sorted((ROOT / "examples").glob("*.yaml")) + [
    ROOT / "charts" / "janus-train" / "ci" / "all-features-values.yaml"
]
SECRET_NAME = re.compile(r"(SECRET|TOKEN|PASSWORD|PASSWD|ACCESS_KEY|PRIVATE|CREDENTIAL)", re.I)
# spec fields that name a Secret (or how credentials are found), never hold one
SECRET_NAME_FIELDS = ("credentials_secret", "credentials_from", "pull_secrets", "tracker_secret")
SECRET_VALUE = re.compile(
    r"(AKIA[0-9A-Z]{16}"  # AWS access key id
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----"
    r"|(?<![A-Za-z0-9/+])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"  # AWS secret access key shape
    r"|ghp_[A-Za-z0-9]{36}|xox[bp]-[A-Za-z0-9-]+)"
)


def _env_literals(obj):
    """(name, value) of every env entry with a literal value, anywhere in the object."""
    if isinstance(obj, dict):
        if "env" in obj and isinstance(obj["env"], list):
            for entry in obj["env"]:
                if "value" in entry:
                    yield entry["name"], str(entry["value"])
        for value in obj.values():
            yield from _env_literals(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _env_literals(value)


def scan(manifests: str) -> list[str]:
    findings = []
    for obj in yaml.safe_load_all(manifests):
        if not obj:
            continue
        if obj["kind"] == "Secret":
            findings.append(
                f"the chart renders a Secret ({obj['metadata']['name']}); credentials must come from the user's Secret"
            )
        if obj["kind"] == "ConfigMap":
            for key, text in obj.get("data", {}).items():
                if SECRET_VALUE.search(text):
                    findings.append(f"ConfigMap {obj['metadata']['name']} key {key} holds a credential-shaped value")
                for line in text.splitlines():
                    k = line.split(":", 1)[0].strip()
                    if SECRET_NAME.search(k) and k not in SECRET_NAME_FIELDS:
                        findings.append(f"ConfigMap {obj['metadata']['name']} has a secret-named key: {line.strip()}")
        for name, value in _env_literals(obj):
            if SECRET_NAME.search(name) or SECRET_VALUE.search(value):
                findings.append(f"{obj['kind']} {obj['metadata']['name']}: env {name} is a literal")
    return findings


@pytest.mark.parametrize("path", VALUE_FILES, ids=[p.stem for p in VALUE_FILES])
def test_rendered_output_holds_no_secrets(path):
    manifests = render_chart(helm_python.values_from_yaml(path.read_text()))
    assert scan(manifests) == []
    assert "secretRef" in manifests  # the credentials do reach the pods, by reference


def test_committed_rendered_examples_hold_no_secrets():
    for path in sorted((ROOT / "manifests" / "examples").glob("*/manifests.yaml")):
        assert scan(path.read_text()) == [], path


def test_scanner_finds_planted_credentials():
    leaked = yaml.safe_dump_all(
        [
            {"kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"job.yaml": "key: AKIAABCDEFGHIJKLMNOP\n"}},
            {
                "kind": "Pod",
                "metadata": {"name": "p"},
                "spec": {"containers": [{"name": "c", "env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"}]}]},
            },
            {"kind": "Secret", "metadata": {"name": "s"}},
        ]
    )
    assert len(scan(leaked)) == 3


def test_secret_template_has_placeholders_only():
    secret = yaml.safe_load((ROOT / "manifests" / "s3-credentials-secret.yaml").read_text())
    assert all(v.startswith("<") and v.endswith(">") for v in secret["stringData"].values())
