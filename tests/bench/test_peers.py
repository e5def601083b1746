"""bench/peers.py's pure parts: MLServer's generated settings, the peers' venv stamp (made
once, made again only when the pins change; pip faked), and the LitServe app's V2 codec.
Nothing is installed or served here: the real peers run in `python -m bench`."""

from __future__ import annotations

import ast
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from bench.alternatives.litserve_app import decode_v2, encode_v2, split, stack
from bench.contenders import ServeContext
from bench.payloads import to_v2_json
from bench.peers import (
    ALTERNATIVES_DIR,
    PeerEnv,
    PeerInstallError,
    describe_versions,
    mlserver_model_settings,
    mlserver_settings,
    peer_contenders,
    peers_root,
    write_mlserver_repo,
)

ROWS = np.arange(3 * 64, dtype=np.float32).reshape(3, 64) % 17


class FakePip:
    """Stands in for `python -m venv` and pip: records every command, makes the venv's
    `bin/python`, answers `pip list`, and fails `pip install` when `refuse` is in its argv."""

    def __init__(self, refuse: str | None = None, listed: dict[str, str] | None = None) -> None:
        self.calls: list[list[str]] = []
        self.refuse = refuse
        self.listed = listed or {"mlserver": "1.7.1", "onnxruntime": "1.31.1", "numpy": "2.4.6"}

    def __call__(self, argv: list[str], log: Path) -> subprocess.CompletedProcess[str]:
        self.calls.append(argv)
        if argv[1:3] == ["-m", "venv"]:
            python = Path(argv[3]) / "bin" / "python"
            python.parent.mkdir(parents=True)
            python.write_text("")
            return subprocess.CompletedProcess(argv, 0, "", "")
        if "list" in argv:
            rows = [{"name": name, "version": version} for name, version in self.listed.items()]
            return subprocess.CompletedProcess(argv, 0, json.dumps(rows), "")
        if self.refuse is not None and any(self.refuse in arg for arg in argv):
            return subprocess.CompletedProcess(argv, 1, "", "ERROR: ResolutionImpossible")
        return subprocess.CompletedProcess(argv, 0, "Successfully installed", "")

    def installs(self) -> list[list[str]]:
        return [argv for argv in self.calls if "install" in argv]


def peer_env(root: Path, pip: FakePip, onnxruntime: str | None = "1.31.1") -> PeerEnv:
    return PeerEnv("mlserver", "1.7.1", ("mlserver==1.7.1",), root, onnxruntime, python="/usr/bin/python3", run=pip)


def test_a_peer_venv_is_made_once_then_reused_from_its_stamp(tmp_path):
    pip, said = FakePip(), []
    env = peer_env(tmp_path, pip)
    stamp = env.ensure(said.append)
    assert pip.calls[0] == ["/usr/bin/python3", "-m", "venv", str(tmp_path / "mlserver-1.7.1")]
    assert pip.installs()[0][-3:] == ["mlserver==1.7.1", "onnxruntime==1.31.1", "numpy"]
    assert stamp["pins"] == ["mlserver==1.7.1", "onnxruntime==1.31.1", "numpy"]
    assert stamp["versions"]["onnxruntime"] == "1.31.1" and stamp["onnxruntime_fallback"] is False
    assert json.loads((tmp_path / "mlserver-1.7.1" / "bench-peer.json").read_text()) == stamp
    assert any("making a venv" in line for line in said) and any("installed in" in line for line in said)

    calls, said = len(pip.calls), []
    assert env.ensure(said.append) == stamp  # same pins: nothing runs, nothing is said
    assert len(pip.calls) == calls and said == []


def test_the_venv_is_made_again_only_when_the_pins_change(tmp_path):
    pip = FakePip()
    peer_env(tmp_path, pip).ensure(lambda _: None)
    (tmp_path / "mlserver-1.7.1" / "leftover").write_text("from the old venv")

    peer_env(tmp_path, pip, onnxruntime="1.31.1").ensure(lambda _: None)
    assert len(pip.installs()) == 1  # unchanged pins: reused

    said: list[str] = []
    stamp = peer_env(tmp_path, pip, onnxruntime="1.32.0").ensure(said.append)
    assert len(pip.installs()) == 2 and "onnxruntime==1.32.0" in stamp["pins"]
    assert not (tmp_path / "mlserver-1.7.1" / "leftover").exists()  # made afresh, not patched
    assert any("pins changed" in line for line in said)


def test_a_venv_without_its_interpreter_is_made_again(tmp_path):
    pip = FakePip()
    env = peer_env(tmp_path, pip)
    env.ensure(lambda _: None)
    env.interpreter.unlink()
    assert env.installed() is None
    env.ensure(lambda _: None)
    assert len(pip.installs()) == 2


def test_onnxruntime_falls_back_to_pips_choice_when_ours_does_not_resolve(tmp_path):
    pip = FakePip(refuse="onnxruntime==")
    stamp = peer_env(tmp_path, pip).ensure(lambda _: None)
    first, second = pip.installs()
    assert "onnxruntime==1.31.1" in first and "onnxruntime" in second and "onnxruntime==1.31.1" not in second
    assert stamp["onnxruntime_fallback"] is True
    assert stamp["pins"] == ["mlserver==1.7.1", "onnxruntime==1.31.1", "numpy"]  # what was asked: reused next time
    assert "pip chose" in describe_versions(stamp, ("mlserver==1.7.1",))


def test_a_failed_install_raises_a_clear_error_and_leaves_no_venv_behind(tmp_path):
    pip = FakePip(refuse="mlserver==")
    env = peer_env(tmp_path, pip)
    with pytest.raises(PeerInstallError, match=r"(?s)mlserver 1\.7\.1: pip install .* failed .*ResolutionImpossible"):
        env.ensure(lambda _: None)
    assert not env.path.exists() and env.installed() is None


def test_without_our_onnxruntime_pip_chooses(tmp_path):
    pip = FakePip()
    stamp = peer_env(tmp_path, pip, onnxruntime=None).ensure(lambda _: None)
    assert stamp["pins"] == ["mlserver==1.7.1", "onnxruntime", "numpy"]


def test_describe_versions_names_the_peer_onnxruntime_and_numpy():
    stamp = {"versions": {"kserve": "0.21.0", "onnxruntime": "1.31.1", "numpy": "2.4.6", "grpcio": "1.85.3"}}
    assert describe_versions(stamp, ("kserve[storage]==0.21.0",), ("grpcio",)) == (
        "kserve 0.21.0, onnxruntime 1.31.1, numpy 2.4.6, grpcio 1.85.3"
    )


def test_mlserver_model_settings_turn_adaptive_batching_on_with_our_runtime(tmp_path):
    onnx = tmp_path / "model.onnx"
    assert mlserver_model_settings(onnx) == {
        "name": "digits",
        "implementation": "mlserver_runtime.OrtDigits",
        "max_batch_size": 64,
        "max_batch_time": 0.002,
        "parameters": {"uri": str(onnx)},
    }


def test_mlserver_settings_run_inference_in_the_main_process_on_our_ports():
    settings = mlserver_settings(8001, 8002, 8003)
    assert settings["parallel_workers"] == 0
    assert (settings["host"], settings["http_port"], settings["grpc_port"], settings["metrics_port"]) == (
        "127.0.0.1", 8001, 8002, 8003,
    )  # fmt: skip
    assert settings["debug"] is False


def test_the_mlserver_repo_is_a_settings_file_and_one_model_folder(tmp_path):
    repo = write_mlserver_repo(tmp_path / "repo", tmp_path / "model.onnx", 1, 2, 3)
    assert json.loads((repo / "settings.json").read_text()) == mlserver_settings(1, 2, 3)
    model = json.loads((repo / "digits" / "model-settings.json").read_text())
    assert model == mlserver_model_settings(tmp_path / "model.onnx")


def test_the_runtime_mlserver_is_told_to_import_exists():
    module, name = mlserver_model_settings(Path("x")).get("implementation").split(".")
    tree = ast.parse((ALTERNATIVES_DIR / f"{module}.py").read_text())
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    assert name in classes and {b.id for b in classes[name].bases if isinstance(b, ast.Name)} == {"MLModel"}
    for script in ("kserve_app.py", "litserve_app.py"):
        ast.parse((ALTERNATIVES_DIR / script).read_text())


def test_the_venvs_live_in_the_bench_homes_peers_folder(tmp_path):
    ctx = ServeContext(workers=1, logs=tmp_path / "logs", rows=ROWS, bentoml_home=tmp_path / "bentoml")
    assert peers_root(ctx) == tmp_path / "peers"


def test_peer_contenders_are_three_alternatives_labelled_with_their_versions():
    peers = peer_contenders()
    assert [p.name for p in peers] == ["mlserver", "kserve", "litserve"]
    assert all(p.kind == "alternative" and p.baseline is None for p in peers)
    assert [p.label.split()[:2] for p in peers] == [["MLServer", "1.7.1"], ["KServe", "0.21.0"], ["LitServe", "0.2.19"]]
    assert [p.env(Path("/h")).pins()[0] for p in peers] == ["mlserver==1.7.1", "kserve==0.21.0", "litserve==0.2.19"]


def test_the_litserve_api_decodes_the_v2_json_body_the_bench_sends():
    body = json.loads(to_v2_json(ROWS).body)
    decoded = decode_v2(body)
    assert decoded.dtype == np.float32 and decoded.shape == (3, 64)
    np.testing.assert_array_equal(decoded, ROWS)
    with pytest.raises(ValueError, match="FP32"):
        decode_v2({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "INT64", "data": [0] * 64}]})


def test_the_litserve_batch_is_split_back_per_request_in_order():
    requests = [ROWS[:1], ROWS[1:3], ROWS[:2]]
    rows, sizes = stack(requests)
    assert rows.shape == (5, 64) and sizes == [1, 2, 2]
    parts = split(rows[:, :10] * 2, sizes)
    assert [p.shape for p in parts] == [(1, 10), (2, 10), (2, 10)]
    for part, request in zip(parts, requests, strict=True):
        np.testing.assert_array_equal(part, request[:, :10] * 2)
    assert len(split(ROWS[:1, :10], [1])) == 1


def test_the_litserve_answer_is_v2_shaped():
    logits = np.arange(20, dtype=np.float32).reshape(2, 10)
    answer = json.loads(json.dumps(encode_v2(logits)))
    assert answer == {
        "model_name": "digits",
        "outputs": [{"name": "logits", "shape": [2, 10], "datatype": "FP32", "data": list(range(20))}],
    }
