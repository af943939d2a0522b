#!/usr/bin/env bash
# The main job end to end, offline: train a small CNN on scikit-learn's digits, convert it for two
# device profiles (x86-64 and rpi4) with the accuracy gate, then install the x86-64 bundle in a local
# agent store and batch-score held-out images with the agent. No server, no network.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup.sh all
export PATH="$PWD/.venv/bin:$PATH"
out=examples/out
rm -rf "$out"
python examples/digits_cnn.py "$out"
edgepack keys generate --out "$out/keys"
edgepack convert "$out/digits_cnn.pt2" --profile x86-64 --profile rpi4 \
    --calibration "$out/calibration.npz" --validation "$out/validation.npz" \
    --name digits --version 1.0.0 --key "$out/keys/edgepack-signing.key" --out "$out/bundles"
edgepack verify "$out/bundles/digits-1.0.0-x86-64.edgepack" --key "$out/keys/edgepack-signing.pub"
edgepack-agent install "$out/bundles/digits-1.0.0-x86-64.edgepack" --store "$out/store" \
    --key "$out/keys/edgepack-signing.pub" --profile x86-64
edgepack-agent predict --input "$out/test_inputs.npy" --output "$out/predictions.jsonl" --store "$out/store"
edgepack-agent status --store "$out/store"
python - "$out" <<'PY'
import json, sys, numpy as np
out = sys.argv[1]
labels = np.load(f"{out}/validation.npz")["labels"][:20]
rows = [json.loads(line) for line in open(f"{out}/predictions.jsonl")]
predicted = np.array([np.argmax(next(iter(r.values()))) for r in rows])
print(f"agent predictions on {len(rows)} held-out digits: {int((predicted == labels).sum())}/{len(rows)} correct")
PY
# The serving daemon on loopback (Open Inference Protocol v2), queried once, then stopped with SIGTERM.
edgepack-agent run --store "$out/store" --port 0 2> "$out/agent.log" &
agent=$!
trap 'kill $agent 2>/dev/null || true' EXIT
python - "$out" <<'PY'
import json, sys, time, urllib.request
import numpy as np
out = sys.argv[1]
port = None
for _ in range(300):
    for line in open(f"{out}/agent.log"):
        entry = json.loads(line)
        if entry.get("msg") == "serving":
            port = entry["port"]
    if port:
        break
    time.sleep(0.05)
image = np.load(f"{out}/test_inputs.npy")[:1]
body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(image.shape), "data": image.ravel().tolist()}]}
request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/digits/infer", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
answer = json.load(urllib.request.urlopen(request, timeout=10))
label = int(np.argmax(answer["outputs"][0]["data"]))
print(f"agent HTTP on 127.0.0.1:{port}: POST /v2/models/digits/infer -> digit {label} "
      f"(model version {answer['model_version']}, true label {int(np.load(f'{out}/validation.npz')['labels'][0])})")
PY
kill -TERM $agent
wait $agent
echo "agent stopped cleanly (exit 0 after SIGTERM)"
