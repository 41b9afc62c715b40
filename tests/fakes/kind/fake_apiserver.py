"""A small in-memory Kubernetes API server behind an httpx2 MockTransport.

The engine's real lightkube client talks to it, so requests are built and answers
decoded by the library itself; the fake records each request (method, path, query,
body) and keeps pods, Deployments, Services and ConfigMaps per namespace, with resource
versions, so lists and watches behave like the real thing for what the lab uses.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx2

ROUTE = re.compile(
    r"^/(?:api/v1|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
    r"/namespaces/(?P<ns>[^/]+)/(?P<plural>[a-z]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>log))?$"
)
KINDS = {
    "pods": "Pod",
    "deployments": "Deployment",
    "services": "Service",
    "configmaps": "ConfigMap",
}


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    params: dict[str, str]
    body: Any


def _matches(obj: dict[str, Any], selector: str | None, fields: str | None) -> bool:
    labels = obj["metadata"].get("labels") or {}
    for term in (selector or "").split(","):
        if term:
            key, _, value = term.partition("=")
            if labels.get(key) != value:
                return False
    for term in (fields or "").split(","):
        if term:
            key, _, value = term.partition("=")
            if key != "metadata.name" or obj["metadata"]["name"] != value:
                return False
    return True


class FakeApiServer:
    """Answers the lab's calls; tests read `calls` and drive pods with `set_status`."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.objects: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        self.history: list[tuple[int, str, str, str, dict[str, Any]]] = []
        self.logs: dict[str, str] = {}
        self.version = 100
        self.lock = threading.Lock()
        self.transport = httpx2.MockTransport(self.handle)

    # -- what tests do -------------------------------------------------------------------

    def requests(self, *, watches: bool = False) -> list[tuple[str, str, dict[str, str]]]:
        """(method, path, query) of each call; watches left out unless asked for."""
        return [
            (c.method, c.path, c.params)
            for c in self.calls
            if watches or c.params.get("watch") != "true"
        ]

    def put(self, plural: str, namespace: str, obj: dict[str, Any], kind: str = "") -> None:
        with self.lock:
            self._store(plural, namespace, obj, kind or "ADDED")

    def set_status(
        self, namespace: str, name: str, status: dict[str, Any], node: str | None = None
    ) -> None:
        with self.lock:
            pod = json.loads(json.dumps(self.objects[("pods", namespace)][name]))
            pod["status"] = status
            if node:
                pod["spec"]["nodeName"] = node
            self._store("pods", namespace, pod, "MODIFIED")

    def remove(self, plural: str, namespace: str, name: str) -> None:
        with self.lock:
            obj = self.objects[(plural, namespace)].pop(name)
            self.version += 1
            self.history.append((self.version, "DELETED", plural, namespace, obj))

    # -- the API -------------------------------------------------------------------------

    def _store(self, plural: str, namespace: str, obj: dict[str, Any], kind: str) -> None:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        obj["metadata"].setdefault("namespace", namespace)
        obj["metadata"].setdefault("creationTimestamp", "2024-11-01T00:00:00Z")
        self.objects.setdefault((plural, namespace), {})[obj["metadata"]["name"]] = obj
        self.history.append((self.version, kind, plural, namespace, obj))

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        params = dict(request.url.params)
        body: Any = json.loads(request.content) if request.content else None
        self.calls.append(Call(request.method, request.url.path, params, body))
        route = ROUTE.match(request.url.path)
        if route is None:
            return self._status(404, "NotFound", f"no route {request.url.path}")
        plural, ns, name = route["plural"], route["ns"], route["name"]
        with self.lock:
            if request.method == "GET" and params.get("watch") == "true":
                return httpx2.Response(
                    200,
                    content=self._watch(plural, ns, params),
                    headers={"Content-Type": "application/json"},
                )
            if request.method == "GET" and route["sub"] == "log":
                if name not in self.objects.get((plural, ns), {}):
                    return self._status(404, "NotFound", f'pods "{name}" not found')
                return httpx2.Response(200, text=self.logs.get(name, ""))
            if request.method == "GET" and name is None:
                items = [
                    o
                    for o in self.objects.get((plural, ns), {}).values()
                    if _matches(o, params.get("labelSelector"), params.get("fieldSelector"))
                ]
                return httpx2.Response(
                    200,
                    json={
                        "apiVersion": "v1",
                        "kind": f"{KINDS[plural]}List",
                        "metadata": {"resourceVersion": str(self.version)},
                        "items": items,
                    },
                )
            if request.method == "GET":
                found = self.objects.get((plural, ns), {}).get(name)
                if found is None:
                    return self._status(404, "NotFound", f'{plural} "{name}" not found')
                return httpx2.Response(200, json=found)
            if request.method == "POST":
                if body["metadata"]["name"] in self.objects.get((plural, ns), {}):
                    return self._status(
                        409,
                        "AlreadyExists",
                        f'{plural} "{body["metadata"]["name"]}" already exists',
                    )
                self._store(plural, ns, json.loads(request.content), "ADDED")
                return httpx2.Response(201, json=body)
            if request.method == "PATCH":
                exists = name in self.objects.get((plural, ns), {})
                self._store(
                    plural, ns, json.loads(request.content), "MODIFIED" if exists else "ADDED"
                )
                return httpx2.Response(200 if exists else 201, json=body)
            if request.method == "DELETE":
                obj = self.objects.get((plural, ns), {}).pop(name, None)
                if obj is None:
                    return self._status(404, "NotFound", f'{plural} "{name}" not found')
                self.version += 1
                self.history.append((self.version, "DELETED", plural, ns, obj))
                return httpx2.Response(
                    200, json={"kind": "Status", "apiVersion": "v1", "status": "Success"}
                )
        return self._status(405, "MethodNotAllowed", request.method)

    async def _watch(self, plural: str, ns: str, params: dict[str, str]) -> AsyncIterator[bytes]:
        since = int(params.get("resourceVersion") or 0)
        if since == 0:  # A watch from nothing first lists what is there, as ADDED.
            with self.lock:
                present = list(self.objects.get((plural, ns), {}).values())
                since = self.version
            for obj in present:
                if _matches(obj, params.get("labelSelector"), params.get("fieldSelector")):
                    yield self._line("ADDED", obj)
        while True:
            with self.lock:
                fresh = [h for h in self.history if h[0] > since and h[2] == plural and h[3] == ns]
            for version, kind, _, _, obj in fresh:
                since = version
                if _matches(obj, params.get("labelSelector"), params.get("fieldSelector")):
                    yield self._line(kind, obj)
            await asyncio.sleep(0.01)

    @staticmethod
    def _line(kind: str, obj: dict[str, Any]) -> bytes:
        return json.dumps({"type": kind, "object": obj}).encode() + b"\n"

    @staticmethod
    def _status(code: int, reason: str, message: str) -> httpx2.Response:
        return httpx2.Response(
            code,
            json={
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "code": code,
                "reason": reason,
                "message": message,
            },
        )
