"""deploy/k8s_history.py: the audit trail in a ConfigMap, against the `FakeApi` stand-in."""

from __future__ import annotations

import pytest

from deploy.k8s_history import KEY, ClusterHistory
from deploy.k8s_target import ConflictError, K8sTarget
from models.errors import CanaryError
from tests.support.k8s import NS, FakeApi, recorded_objects

NAME = "bento-canary-history"


def test_the_first_append_creates_the_configmap_and_later_ones_extend_it(monkeypatch):
    api = FakeApi({})
    history = ClusterHistory(api, NS, NAME)
    assert history.entries() == []
    monkeypatch.setenv("CANARY_ACTOR", "alice")
    history.append("weight", "10% -> 25%", "step")
    monkeypatch.setenv("CANARY_ACTOR", "bob")
    history.append("rollback", "25% -> 0%", "p95 up", exit_code=1)
    entries = history.entries()
    assert [(e["who"], e["action"], e["reason"]) for e in entries] == [("alice", "weight", "step"),
                                                                      ("bob", "rollback", "p95 up")]  # fmt: skip
    assert entries[1]["exit_code"] == 1
    stored = api.objects["ConfigMap", NAME]
    assert stored["metadata"]["labels"] == {"app.kubernetes.io/part-of": "bento-canary"}
    assert len(stored["data"][KEY].splitlines()) == 2


def test_a_racing_writer_loses_nothing():
    """Between this append's read and its patch another engineer appends: the patch carries
    the old resourceVersion, gets 409, and the append is retried on the fresh copy."""
    api = FakeApi({})
    history = ClusterHistory(api, NS, NAME)
    history.append("weight", "first")
    real_get = api.get
    raced = []

    def get(kind, namespace, name):
        seen = real_get(kind, namespace, name)
        if not raced:
            raced.append(True)
            ClusterHistory(api, NS, NAME).append("switch", "by someone else")
        return seen

    api.get = get  # type: ignore[method-assign]
    history.append("rollback", "mine")
    assert [e["detail"] for e in history.entries()] == ["first", "by someone else", "mine"]


def test_a_configmap_that_keeps_changing_is_a_one_line_error():
    api = FakeApi({})
    history = ClusterHistory(api, NS, NAME)
    history.append("weight", "first")
    api.fail["ConfigMap", NAME] = ConflictError("the ConfigMap changed meanwhile")
    with pytest.raises(CanaryError, match="^could not append to ConfigMap bento-canary/bento-canary-history"):
        history.append("weight", "second")


def test_old_entries_are_dropped_past_the_cap_and_mangled_lines_skipped():
    api = FakeApi({})
    history = ClusterHistory(api, NS, NAME, max_entries=10)
    for step in range(15):
        history.append("weight", f"step {step}")
    assert [e["detail"] for e in history.entries()] == [f"step {step}" for step in range(5, 15)]
    stored = api.objects["ConfigMap", NAME]["data"]
    stored[KEY] = "not json\n" + stored[KEY] + "[1, 2]\n"  # someone edited it by hand
    assert len(history.entries()) == 10


def test_a_history_that_cannot_be_written_does_not_undo_the_change():
    api = FakeApi(recorded_objects())
    api.fail["ConfigMap", NAME] = CanaryError("forbidden")
    target = K8sTarget(NS, api)
    api.objects["ConfigMap", NAME] = {"metadata": {"name": NAME, "resourceVersion": "1"}, "data": {}}
    target.weight(30)
    assert target.status()["weight"] == 30
    assert target.warnings == ["warning: not recorded in the cluster's history: forbidden"]
