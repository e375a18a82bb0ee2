"""The Dockerfile installs exactly the lock's pins, prebuilds the Adam ops and runs as non-root."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def instructions() -> list[str]:
    """Dockerfile instructions with continuation lines joined."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    return [l.strip() for l in joined.splitlines() if l.strip() and not l.strip().startswith("#")]


def pip_installs() -> list[list[str]]:
    commands = []
    for line in instructions():
        if line.startswith("RUN"):
            command: list[str] = []
            for word in shlex.split(line[3:]) + ["&&"]:
                if word in ("&&", "||"):
                    if command and "pip" in " ".join(command[:3]) and "install" in command:
                        commands.append(command)
                    command = []
                else:
                    command.append(word)
    return commands


def test_every_pip_install_is_constrained_by_the_lock():
    installs = pip_installs()
    assert len(installs) >= 3
    for words in installs:
        if words[-1] == "pip==25.3":  # the installer itself, pinned like scripts/install.sh
            continue
        assert "-c" in words and words[words.index("-c") + 1] == "constraints.txt", words


def test_explicit_pins_equal_the_lock():
    pins = lock()
    explicit = {}
    for words in pip_installs():
        for word in words:
            m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s]+)", word)
            if m and m.group(1) != "pip":
                explicit[m.group(1).lower().replace("_", "-")] = m.group(2)
    assert explicit["torch"] == pins["torch"]
    assert explicit["deepspeed"] == pins["deepspeed"]
    assert all(pins[name] == version for name, version in explicit.items()), explicit
    # transformers comes in through the project with -c constraints.txt: the lock pins it
    assert "transformers" in pins
    assert explicit.get("transformers", pins["transformers"]) == pins["transformers"]
    assert "COPY constraints.txt" in DOCKERFILE


def test_deepspeed_ops_are_prebuilt_for_cuda():
    lines = instructions()
    assert lines[0].startswith("ARG CUDA_DEVEL=nvidia/cuda:") and "devel" in lines[0]
    env = " ".join(l for l in lines if l.startswith("ENV"))
    assert "DS_BUILD_CPU_ADAM=1" in env and "DS_BUILD_FUSED_ADAM=1" in env
    deepspeed_install = next(w for w in pip_installs() if any(x.startswith("deepspeed==") for x in w))
    assert "--no-build-isolation" in deepspeed_install  # builds against the locked torch
    # the build fails unless both ops were compiled into the wheel
    assert "installed_ops as o; assert o['cpu_adam'] and o['fused_adam']" in DOCKERFILE


def test_runs_as_non_root_with_janus_job_entrypoint():
    lines = instructions()
    users = [l.split()[1] for l in lines if l.startswith("USER")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert lines[-2] == 'ENTRYPOINT ["janus-job"]' or 'ENTRYPOINT ["janus-job"]' in lines
    assert "1000" in users[-1]  # matches the chart's runAsUser


# -- the RDMA userspace NCCL's IB transport needs ---------------------------------------------------

RDMA_PACKAGES = {"rdma-core", "libibverbs1", "ibverbs-providers"}


def runtime_apt_packages() -> list[str]:
    """Packages the last stage (the image the pods run) installs with apt-get."""
    last_from = max(i for i, line in enumerate(instructions()) if line.startswith("FROM"))
    packages = []
    for line in instructions()[last_from:]:
        if line.startswith("RUN") and "apt-get install" in line:
            for command in re.split(r"&&|\|\|", line[3:]):
                words = shlex.split(command)
                if words[:2] == ["apt-get", "install"]:
                    packages += [w for w in words[2:] if not w.startswith("-")]
    return packages


def test_runtime_stage_installs_the_verbs_userspace_and_checks_it_loads():
    packages = runtime_apt_packages()
    assert RDMA_PACKAGES <= set(packages), packages
    assert "python3" in packages  # the parser read the right stage
    base = next(l for l in instructions() if l.startswith("ARG CUDA_RUNTIME="))
    assert "ubuntu24.04" in base  # the package names above are Ubuntu 24.04's
    last_from = max(i for i, line in enumerate(instructions()) if line.startswith("FROM"))
    runtime = instructions()[last_from:]
    check = [l for l in runtime if "load_verbs" in l]
    assert check and runtime.index(check[0]) < runtime.index(next(l for l in runtime if l.startswith("USER")))
    assert "/opt/janus/NCCL_VERSION" in DOCKERFILE and "nvidia-nccl-cu12" in DOCKERFILE


def test_the_images_rdma_packages_install_here_and_load_libibverbs():
    """apt-get installs the runtime stage's RDMA packages on this machine (Debian/Ubuntu, root), then a
    fresh interpreter loads libibverbs.so.1 and lists verbs devices through janus_job.deploy.network."""
    import os
    import shutil
    import subprocess
    import sys

    import pytest

    if shutil.which("apt-get") is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("needs apt-get as root (a Debian/Ubuntu machine) to install the image's packages")
    packages = [p for p in runtime_apt_packages() if p in RDMA_PACKAGES or "verbs" in p]
    install = ["apt-get", "install", "-y", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=300", *packages]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    proc = subprocess.run(install, capture_output=True, text=True, env=env)
    if proc.returncode != 0:  # package lists may be missing or old
        subprocess.run(["apt-get", "update"], capture_output=True, text=True, env=env)
        proc = subprocess.run(install, capture_output=True, text=True, env=env)
    if proc.returncode != 0 and ("Unable to locate package" in proc.stderr or "Temporary failure" in proc.stderr
                                 or "Could not resolve" in proc.stderr):
        pytest.skip(f"the package manager cannot provide {packages} here: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0, proc.stderr
    code = ("import ctypes; ctypes.CDLL('libibverbs.so.1'); "
            "from janus_job.deploy.network import load_verbs, verbs_device_names; "
            "print('devices', verbs_device_names(load_verbs()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("devices [")  # a list of HCA names (empty on a machine without HCAs)


def test_production_imports_come_from_the_main_dependencies():
    """Every third-party module janus_job imports (at module level or inside functions) is provided by a
    distribution in [project.dependencies] (or a dependency of one), not by the [dev] extra: a plain
    `pip install janus-train` (and the image, which installs without extras) runs every command, e.g.
    `janus-job render` needs helm-python-sdk. The optional trackers (wandb, mlflow) are the exception:
    the trainer warns and goes on without them."""
    import ast
    import sys
    import tomllib
    from importlib import metadata

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional_trackers = {"wandb", "mlflow"}

    def closure(names):
        seen, todo = set(), [Requirement(n).name.lower() for n in names]
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            for req in metadata.requires(name) or []:
                parsed = Requirement(req)
                if parsed.marker is None or parsed.marker.evaluate({"extra": ""}):
                    todo.append(parsed.name.lower())
        return {n.replace("_", "-") for n in seen}

    main = closure(project["dependencies"])
    providers = metadata.packages_distributions()
    missing = {}
    def guarded(tree):
        """Imports inside `try: ... except ImportError` have a fallback: not required."""
        out = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Try) and any(
                    isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                    for h in node.handlers):
                out.update(id(n) for stmt in node.body for n in ast.walk(stmt))
        return out

    for path in (ROOT / "janus_job").rglob("*.py"):
        tree = ast.parse(path.read_text())
        skip = guarded(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "janus_job" or top in optional_trackers:
                    continue
                dists = {d.lower().replace("_", "-") for d in providers.get(top, [])}
                if not dists & main:
                    missing.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    assert not missing, f"imported but not installed by the main dependencies: {missing}"
