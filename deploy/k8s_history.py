"""`canary --target k8s history`: the audit trail kept in the cluster, in one ConfigMap.

Two release engineers on two laptops see the same trail, and so does whoever runs `kubectl
-n bento-canary get configmap bento-canary-history -o yaml`. Entries have the local
history's shape (`deploy.state.history_line`: time, who, action, detail, reason), one JSON
object per line under the key `history.jsonl`. An append reads the ConfigMap and sends a
merge patch carrying its `resourceVersion`, so two appends at once never lose one: the
loser gets 409 and appends again on the fresh copy. The oldest entries are dropped past
`max_entries` (a ConfigMap holds at most 1 MiB).
"""

from __future__ import annotations

import json
from typing import Any

from deploy.k8s_plan import MERGE_PATCH, K8sPatch
from deploy.state import history_line
from models.errors import CanaryError, ConflictError, NotFoundError

KEY = "history.jsonl"
ATTEMPTS = 5  # appends racing on one ConfigMap; each retry reads the winner's copy


class ClusterHistory:
    def __init__(self, api: Any, namespace: str, name: str, max_entries: int = 500) -> None:
        self.api, self.namespace, self.name, self.max_entries = api, namespace, name, max_entries

    def entries(self) -> list[dict[str, Any]]:
        """Oldest first; an absent ConfigMap is an empty trail."""
        try:
            config_map = self.api.get("ConfigMap", self.namespace, self.name)
        except NotFoundError:
            return []
        return _parse((config_map.get("data") or {}).get(KEY, ""))

    def append(self, action: str, detail: str, reason: str = "", **extra: Any) -> None:
        line = history_line(action, detail, reason, **extra)
        for _ in range(ATTEMPTS):
            try:
                config_map = self.api.get("ConfigMap", self.namespace, self.name)
            except NotFoundError:
                try:
                    self.api.create("ConfigMap", self.namespace, self._new(line))
                    return
                except ConflictError:  # someone created it meanwhile: append to theirs
                    continue
            kept = ((config_map.get("data") or {}).get(KEY, "")).splitlines()
            lines = [*(text for text in kept if text.strip()), line][-self.max_entries :]
            body = {
                "metadata": {"resourceVersion": config_map["metadata"]["resourceVersion"]},
                "data": {KEY: "\n".join(lines) + "\n"},
            }
            try:
                self.api.patch(K8sPatch("ConfigMap", self.name, self.namespace, MERGE_PATCH, body))
                return
            except ConflictError:
                continue
        raise CanaryError(f"could not append to ConfigMap {self.namespace}/{self.name}: it kept changing")

    def _new(self, line: str) -> dict[str, Any]:
        return {
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": self.name, "namespace": self.namespace,
                         "labels": {"app.kubernetes.io/part-of": "bento-canary"}},
            "data": {KEY: line + "\n"},
        }  # fmt: skip


def _parse(text: str) -> list[dict[str, Any]]:
    """Entries from the ConfigMap's text; a line someone mangled by hand is skipped, not fatal."""
    entries = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries
