"""Rendering the chart with the real Helm engine (helm_python), offline."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from janus_job.errors import JobError

RELEASE_NAME = "janus-train"
CHART_DIR = Path(os.environ.get("JANUS_CHART_DIR", Path(__file__).resolve().parents[2] / "charts" / "janus-train"))


class _ManifestDumper(yaml.SafeDumper):
    """Multi-line strings (the spec in the ConfigMap) as readable literal blocks."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ManifestDumper.add_representer(str, _str_representer)


def _chart_dir() -> Path:
    if not (CHART_DIR / "Chart.yaml").is_file():
        raise JobError(
            f"the Helm chart is not at {CHART_DIR}; fix: run from a janus-train checkout or set JANUS_CHART_DIR"
        )
    return CHART_DIR


def render_chart(values: dict[str, Any], release: str = RELEASE_NAME, namespace: str = "default") -> str:
    """The chart's manifests for `values` as one multi-document YAML, in a stable order.

    Helm checks `values` against values.schema.json first, exactly as `helm install` does."""
    import helm_python

    try:
        with helm_python.Chart.load(_chart_dir()) as chart:
            chart.validate_schema(values)
            rendered = chart.render(values=values, name=release, namespace=namespace, is_install=True)
    except helm_python.HelmError as err:
        raise JobError(f"Helm refused the values: {err}") from None
    docs = []
    for template in sorted(rendered):
        text = rendered[template].strip()
        if not template.endswith((".yaml", ".yml")) or not text:
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append(f"# Source: {template}\n" + yaml.dump(doc, Dumper=_ManifestDumper, sort_keys=False))
    return "---\n".join(docs)


def render_objects(
    values: dict[str, Any], release: str = RELEASE_NAME, namespace: str = "default"
) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(render_chart(values, release, namespace)) if d]
