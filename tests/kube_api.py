"""A local stand-in for the few Kubernetes API calls the starter and `janus-job upgrade` make.

A threading http.server on 127.0.0.1 that answers exactly: GET /version, GET the PyTorchJob CRD,
GET/PATCH one PyTorchJob, GET and watch one batch/v1 Job, POST Events, GET Pods by name and list them
by label, list and PATCH Kueue Workloads. Anything else is answered 404 and recorded in `unexpected`, so a test can
assert the code made no other call. State is plain dicts the test sets; `on_*` hooks let a test
script what the cluster does next (the operator deleting pods, the Job controller failing a Job).
The server stops itself after `lifetime_s` even if a test forgets to.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"


class KubeAPI:
    def __init__(self, namespace: str = "janus", lifetime_s: float = 60.0) -> None:
        self.namespace = namespace
        self.cond = threading.Condition()
        self.version = {"major": "1", "minor": "31", "gitVersion": "v1.31.4", "gitCommit": "0" * 40,
                        "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.22",
                        "compiler": "gc", "platform": "linux/amd64"}
        self.crd: dict[str, Any] | None = None
        self.pytorchjobs: dict[str, dict[str, Any]] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.pods: dict[str, dict[str, Any]] = {}
        self.workloads: dict[str, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.requests: list[tuple[str, str]] = []  # (method, path?query)
        self.patches: list[tuple[str, str, Any]] = []  # (path, content type, body)
        self.unexpected: list[str] = []
        self.watch_events: list[tuple[str, dict[str, Any]]] = []  # pending (type, object) for job watches
        self.on_watch: Callable[[KubeAPI], None] | None = None  # called once a job watch is open
        self.on_patch_pytorchjob: Callable[[KubeAPI, str, dict[str, Any]], None] | None = None
        self.on_list_pods: Callable[[KubeAPI], None] | None = None
        self.on_get_pytorchjob: Callable[[KubeAPI, str], None] | None = None
        self.on_get_pod: Callable[[KubeAPI, str], None] | None = None
        self._rv = 100
        self._stopped = False
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._timer = threading.Timer(lifetime_s, self.stop)
        self._timer.daemon = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> KubeAPI:
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._timer.cancel()
        with self.cond:
            self._stopped = True
            self.cond.notify_all()
        self._server.shutdown()
        self._server.server_close()

    def next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    # -- state helpers for tests ---------------------------------------------------------------

    def add_pytorchjob(self, name: str, suspend: bool, labels: dict[str, str] | None = None,
                       conditions: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        obj = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
               "metadata": {"name": name, "namespace": self.namespace, "uid": f"uid-{name}",
                            "resourceVersion": self.next_rv(), "labels": dict(labels or {})},
               "spec": {"runPolicy": {"suspend": suspend}, "pytorchReplicaSpecs": {}},
               "status": {"conditions": list(conditions or [])}}
        self.pytorchjobs[name] = obj
        return obj

    def add_job(self, name: str, conditions: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        obj = {"apiVersion": "batch/v1", "kind": "Job",
               "metadata": {"name": name, "namespace": self.namespace, "uid": f"uid-{name}",
                            "resourceVersion": self.next_rv()},
               "spec": {"template": {"spec": {"containers": []}}},
               "status": {"conditions": list(conditions or [])}}
        self.jobs[name] = obj
        return obj

    def set_job_condition(self, name: str, kind: str, reason: str = "", message: str = "") -> None:
        """What the Job controller does: write the condition and tell the watchers."""
        with self.cond:
            job = self.jobs[name]
            job["status"]["conditions"].append({"type": kind, "status": "True", "reason": reason, "message": message})
            job["metadata"]["resourceVersion"] = self.next_rv()
            self.watch_events.append(("MODIFIED", json.loads(json.dumps(job))))
            self.cond.notify_all()

    def add_pod(self, name: str, job: str) -> None:
        self.pods[name] = {"apiVersion": "v1", "kind": "Pod",
                           "metadata": {"name": name, "namespace": self.namespace,
                                        "labels": {"training.kubeflow.org/job-name": job}}}

    # -- the HTTP side -------------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # a watch is a chunked stream, one event per chunk, as the API server sends

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _not_found(self, what: str) -> None:
                self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                                 "message": f"{what} not found", "code": 404})

            def _body(self) -> Any:
                length = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(length) or b"null")

            def do_GET(self) -> None:
                self._route("GET")

            def do_PATCH(self) -> None:
                self._route("PATCH")

            def do_POST(self) -> None:
                self._route("POST")

            def _route(self, method: str) -> None:
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                api.requests.append((method, self.path))
                ns = re.escape(api.namespace)
                p = url.path
                if method == "GET" and p in ("/version", "/version/"):
                    return self._send(200, api.version)
                if method == "GET" and p == f"{CRDS}/pytorchjobs.kubeflow.org":
                    return self._send(200, api.crd) if api.crd else self._not_found("crd")
                m = re.fullmatch(rf"/apis/kubeflow\.org/v1/namespaces/{ns}/pytorchjobs/([^/]+)", p)
                if m and method in ("GET", "PATCH"):
                    return self._pytorchjob(method, m.group(1))
                m = re.fullmatch(rf"/apis/batch/v1/namespaces/{ns}/jobs/([^/]+)", p)
                if m and method == "GET":
                    job = api.jobs.get(m.group(1))
                    return self._send(200, job) if job else self._not_found("job")
                if method == "GET" and p == f"/apis/batch/v1/namespaces/{api.namespace}/jobs" and query.get("watch"):
                    return self._watch_job(query)
                if method == "POST" and p == f"/api/v1/namespaces/{api.namespace}/events":
                    event = self._body()
                    api.events.append(event)
                    return self._send(201, event)
                m = re.fullmatch(rf"/api/v1/namespaces/{ns}/pods/([^/]+)", p)
                if m and method == "GET":
                    if api.on_get_pod:
                        api.on_get_pod(api, m.group(1))
                    pod = api.pods.get(m.group(1))
                    return self._send(200, pod) if pod else self._not_found("pod")
                if method == "GET" and p == f"/api/v1/namespaces/{api.namespace}/pods":
                    if api.on_list_pods:
                        api.on_list_pods(api)
                    key, _, value = query.get("labelSelector", "").partition("=")
                    items = [pod for pod in api.pods.values() if pod["metadata"]["labels"].get(key) == value]
                    return self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
                if method == "GET" and p == f"/apis/kueue.x-k8s.io/v1beta1/namespaces/{api.namespace}/workloads":
                    key, _, value = query.get("labelSelector", "").partition("=")
                    items = [w for w in api.workloads.values() if w["metadata"]["labels"].get(key) == value]
                    return self._send(200, {"kind": "WorkloadList", "metadata": {}, "items": items})
                m = re.fullmatch(rf"/apis/kueue\.x-k8s\.io/v1beta1/namespaces/{ns}/workloads/([^/]+)", p)
                if m and method == "PATCH" and m.group(1) in api.workloads:
                    body = self._body()
                    api.patches.append((p, self.headers.get("Content-Type"), body))
                    api.workloads[m.group(1)] = merge_patch(api.workloads[m.group(1)], body)
                    return self._send(200, api.workloads[m.group(1)])
                api.unexpected.append(f"{method} {self.path}")
                return self._not_found(p)

            def _pytorchjob(self, method: str, name: str) -> None:
                obj = api.pytorchjobs.get(name)
                if obj is None:
                    return self._not_found("pytorchjob")
                if method == "GET" and api.on_get_pytorchjob:
                    api.on_get_pytorchjob(api, name)
                    obj = api.pytorchjobs[name]
                if method == "PATCH":
                    body = self._body()
                    api.patches.append((self.path, self.headers.get("Content-Type"), body))
                    obj = merge_patch(obj, body)
                    obj["metadata"]["resourceVersion"] = api.next_rv()
                    api.pytorchjobs[name] = obj
                    if api.on_patch_pytorchjob:
                        api.on_patch_pytorchjob(api, name, body)
                    obj = api.pytorchjobs[name]
                return self._send(200, obj)

            def _watch_job(self, query: dict[str, str]) -> None:
                name = query.get("fieldSelector", "").removeprefix("metadata.name=")
                if not query.get("fieldSelector", "").startswith("metadata.name="):
                    api.unexpected.append(f"watch without a name: {self.path}")
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self.close_connection = True
                if api.on_watch:
                    hook, api.on_watch = api.on_watch, None
                    threading.Thread(target=hook, args=(api,), daemon=True).start()
                deadline = time.monotonic() + min(float(query.get("timeoutSeconds", 5)), 10.0)
                with api.cond:
                    while time.monotonic() < deadline and not api._stopped:
                        while api.watch_events:
                            kind, obj = api.watch_events.pop(0)
                            if obj["metadata"]["name"] == name:
                                line = json.dumps({"type": kind, "object": obj}).encode() + b"\n"
                                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                                self.wfile.flush()
                        api.cond.wait(timeout=0.2)
                self.wfile.write(b"0\r\n\r\n")

        return Handler
