"""`canary --target k8s <every command>` against a cluster nobody answers: one line, exit 1,
and the local state folder untouched (no command falls through to the local stack)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deploy.cli import main
from deploy.process import free_port

COMMANDS = [
    ["up"], ["down"], ["deploy", "3"], ["weight", "30"], ["switch"], ["promote"], ["promote", "--bake", "2m"],
    ["rollback"], ["shadow", "on"], ["status"], ["history"], ["gate"], ["rollout"],
]  # fmt: skip


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")} if folder.exists() else {}


@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_every_command_on_an_unreachable_cluster_is_one_line_and_leaves_local_state(
    args, tmp_path, monkeypatch, capsys
):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "gone",
        "clusters": [{"name": "gone", "cluster": {"server": f"https://127.0.0.1:{free_port()}"}}],
        "users": [{"name": "gone", "user": {"token": "t"}}],
        "contexts": [{"name": "gone", "context": {"cluster": "gone", "user": "gone"}}],
    }))  # fmt: skip
    home = tmp_path / "state"
    (home / "stack").mkdir(parents=True)
    (home / "stack" / "state.json").write_text('{"stable": "blue", "weight": 25}')
    monkeypatch.setenv("CANARY_HOME", str(home))
    monkeypatch.setenv("CANARY_K8S_KUBECONFIG", str(kubeconfig))
    monkeypatch.setenv("CANARY_K8S_REQUEST_TIMEOUT_S", "3")
    before = tree(home)
    with pytest.raises(SystemExit) as exited:
        main(["--target", "k8s", *args])
    err = capsys.readouterr().err
    assert exited.value.code == 1, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert tree(home) == before
