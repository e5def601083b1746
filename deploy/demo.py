"""`canary demo`: the main job end to end, ending in real predictions from a served Bento."""

from __future__ import annotations

import json

import httpx

from models.home import CanaryHome
from models.pipeline import Say

DEMO_ROWS = 8


def v2_request(pixels, request_id: str = "demo") -> dict:
    return {
        "id": request_id,
        "inputs": [
            {"name": "input", "shape": list(pixels.shape), "datatype": "FP32", "data": pixels.reshape(-1).tolist()}
        ],
    }


def run_demo(home: CanaryHome, epochs: int, say: Say) -> None:
    from deploy.process import free_port, served_bento
    from models.bento import build_bento
    from models.data import load_split
    from models.pipeline import export_version, train_and_register
    from models.train import TrainConfig

    say("== 1/5 train and register (MLflow) ==")
    trained = train_and_register(home, TrainConfig(model="digits-cnn", epochs=epochs), say)
    version = trained.ref.version
    say("== 2/5 export to ONNX with a parity check, import into the BentoML store ==")
    exported = export_version(home, version=version, say=say)
    say("== 3/5 build the Bento ==")
    built = build_bento(home, version=version, say=say)
    say(f"== 4/5 serve {built.tag} ==")
    port = free_port()
    split = load_split()
    pixels = split.x_test[:DEMO_ROWS]
    rest_port = free_port()
    env = {"CANARY_SERVICE_REST_PORT": str(rest_port)}
    with served_bento(built.tag, port, home.logs / "demo-serve.log", env) as base:
        v2 = f"http://127.0.0.1:{rest_port}"
        say(f"serving at {base} (BentoML), V2 REST listener {v2} (log {home.logs / 'demo-serve.log'})")
        say("== 5/5 predict over the Open Inference Protocol (V2 REST) ==")
        answer = httpx.post(f"{v2}/v2/models/digits/infer", json=v2_request(pixels), timeout=30)
        answer.raise_for_status()
        body = answer.json()
        meta = httpx.get(f"{base}/v2/models/digits", timeout=10).json()
    logits = body["outputs"][0]["data"]
    rows = [logits[i * 10 : (i + 1) * 10] for i in range(DEMO_ROWS)]
    predicted = [max(range(10), key=row.__getitem__) for row in rows]
    print(f"\nmodel digits version {body['model_version']} (sha256 {meta['parameters']['sha256'][:12]}...) answered:")
    print("  digit  predicted")
    for truth, guess in zip(split.y_test[:DEMO_ROWS], predicted, strict=True):
        print(f"  {int(truth):>5}  {guess:>9}  {'ok' if truth == guess else 'WRONG'}")
    correct = sum(int(t == p) for t, p in zip(split.y_test[:DEMO_ROWS], predicted, strict=True))
    print(f"{correct}/{DEMO_ROWS} correct; ONNX test accuracy {exported.onnx_test_accuracy:.2%}\n")
    example = json.dumps(v2_request(pixels[:1]))
    print("where to look next:")
    print(f"  serve it again:   .venv/bin/canary serve {built.tag} --port 3000")
    print(f"  then call it:     curl -s localhost:8000/v2/models/digits/infer -d '{example[:60]}...'")
    print(f"  the Bento:        {built.archive} ({built.archive_bytes / 1e6:.2f} MB, no torch/mlflow inside)")
    print(f"  MLflow runs:      .venv/bin/mlflow ui --backend-store-uri {home.mlflow_uri}")
    print(f"  state folder:     {home.home} (make clean removes it)")
