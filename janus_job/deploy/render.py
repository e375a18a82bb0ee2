"""Rendering the chart with the real Helm engine (helm_python), offline."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Mapping
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


def write_outputs(directory: str | os.PathLike, files: Mapping[str, str]) -> None:
    """Writes every file of ``files`` (name -> text) into ``directory``, or none of them.

    The files are written in full to a staging directory beside the target first, with the
    permissions a plain ``open`` gives (0666 less the umask). A new directory then appears by one
    rename; into an existing one each file is swapped in, and if any swap fails the files already
    swapped are put back, so a failure leaves the old files as they were and never a mix.
    Nothing else in the directory is touched.
    """
    directory = Path(directory).absolute()
    if directory.exists() and not directory.is_dir():
        raise JobError(f"--out {directory}: exists and is not a directory; fix: pass a directory path")
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        stage = directory.parent / f".{directory.name}.{uuid.uuid4().hex[:8]}.tmp"
        stage.mkdir()  # 0777 less the umask, like any new directory
    except OSError as err:
        raise JobError(f"--out {directory}: cannot create it ({err.strerror or err}); "
                       "fix: pass a writable path") from None
    try:
        for name, text in files.items():
            fd = os.open(stage / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
        if not directory.exists():
            os.rename(stage, directory)
            return
        _swap_in(stage, directory, list(files))
    except OSError as err:
        raise JobError(f"--out {directory}: writing failed ({err}); nothing there was changed") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _swap_in(stage: Path, directory: Path, names: list[str]) -> None:
    """Replaces ``directory/name`` by ``stage/name`` for every name; all or none."""
    backups: dict[str, Path] = {}
    done: list[str] = []
    try:
        for name in names:
            target = directory / name
            if target.is_file():
                backup = stage / f".{name}.previous"
                try:
                    os.link(target, backup)
                except OSError:  # a filesystem without hard links
                    shutil.copy2(target, backup)
                backups[name] = backup
            os.replace(stage / name, target)
            done.append(name)
    except OSError:
        for name in reversed(done):
            if name in backups:
                os.replace(backups[name], directory / name)
            else:
                (directory / name).unlink(missing_ok=True)
        raise
