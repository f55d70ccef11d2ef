#!/usr/bin/env bash
# Check Open WebUI against a running radixserve: start Open WebUI on a fresh data folder pointed at the
# server, sign up its first (admin) user, then check that it lists the model, answers a chat and
# generates a chat title (a background task that sends no max_tokens and no temperature) in time.
# Not part of CI: it needs an Open WebUI install (`pip install open-webui`, which downloads a lot).
#
# Usage: scripts/check_open_webui.sh [RADIXSERVE_URL]      (default http://127.0.0.1:30000)
# Env:   OPEN_WEBUI_PORT (8089), RADIXSERVE_API_KEY (the server's --api-key, if any),
#        TASK_LIMIT_S (60: the most seconds the title task may take), OPEN_WEBUI (open-webui).
# For a small model start the server with bounded defaults, e.g.
#   radixserve serve --preferred-sampling-params '{"temperature": 0.7, "max_new_tokens": 512}'
set -euo pipefail

SERVER=${1:-http://127.0.0.1:30000}
PORT=${OPEN_WEBUI_PORT:-8089}
TASK_LIMIT_S=${TASK_LIMIT_S:-60}
OPEN_WEBUI=${OPEN_WEBUI:-open-webui}
UI="http://127.0.0.1:$PORT"

command -v "$OPEN_WEBUI" >/dev/null || { echo "error: $OPEN_WEBUI not found (pip install open-webui)" >&2; exit 2; }
curl -sf "$SERVER/health" >/dev/null || { echo "error: no healthy radixserve at $SERVER" >&2; exit 2; }

DATA=$(mktemp -d)
# Open WebUI's settings by environment: one OpenAI-compatible connection (radixserve), no Ollama, no
# downloads at start (offline: its RAG embedding model is not fetched), its own data folder.
export DATA_DIR="$DATA"
export OPENAI_API_BASE_URL="$SERVER/v1"
export OPENAI_API_KEY="${RADIXSERVE_API_KEY:-none}"
export ENABLE_OLLAMA_API=false
export OFFLINE_MODE=true
export HF_HUB_OFFLINE=1
export WEBUI_SECRET_KEY=radixserve-check
export WEBUI_AUTH=true
export ENABLE_SIGNUP=true
export ENABLE_TITLE_GENERATION=true

"$OPEN_WEBUI" serve --host 127.0.0.1 --port "$PORT" >"$DATA/open-webui.log" 2>&1 &
UI_PID=$!
cleanup() {
    kill "$UI_PID" 2>/dev/null || true
    wait "$UI_PID" 2>/dev/null || true
    rm -rf "$DATA"
}
trap cleanup EXIT

fail() {
    echo "FAIL: $*" >&2
    echo "--- last lines of Open WebUI's log ---" >&2
    tail -n 30 "$DATA/open-webui.log" >&2 || true
    exit 1
}

json() {  # json FIELD-EXPRESSION: evaluate a Python expression over the JSON on stdin (as `d`)
    python3 -c "import json, sys; d = json.load(sys.stdin); print($1)"
}

echo "waiting for Open WebUI on $UI ..."
for _ in $(seq 1 180); do
    curl -sf "$UI/health" >/dev/null 2>&1 && break
    kill -0 "$UI_PID" 2>/dev/null || fail "Open WebUI exited"
    sleep 1
done
curl -sf "$UI/health" >/dev/null || fail "Open WebUI did not come up in 180 s"

TOKEN=$(curl -sf -X POST "$UI/api/v1/auths/signup" -H 'Content-Type: application/json' \
    -d '{"name": "check", "email": "check@example.com", "password": "radixserve-check"}' | json 'd["token"]') \
    || fail "signing up the first user"
AUTH=(-H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json')

MODEL=$(curl -sf "${AUTH[@]}" "$UI/api/models" | json '[m["id"] for m in d["data"]][0]') \
    || fail "Open WebUI lists no model from $SERVER"
echo "ok: Open WebUI lists $MODEL"

CHAT=$(curl -sf "${AUTH[@]}" -X POST "$UI/api/chat/completions" -d "{
    \"model\": \"$MODEL\", \"stream\": false,
    \"messages\": [{\"role\": \"user\", \"content\": \"Say hello in five words.\"}]}") \
    || fail "chat completion through Open WebUI"
REPLY=$(echo "$CHAT" | json 'd["choices"][0]["message"]["content"]')
[ -n "$REPLY" ] || fail "empty chat reply: $CHAT"
echo "ok: chat answered: ${REPLY:0:80}"

STARTED=$(date +%s)
TITLE=$(curl -sf --max-time "$TASK_LIMIT_S" "${AUTH[@]}" -X POST "$UI/api/v1/tasks/title/completions" -d "{
    \"model\": \"$MODEL\",
    \"messages\": [{\"role\": \"user\", \"content\": \"Say hello in five words.\"},
                   {\"role\": \"assistant\", \"content\": $(printf '%s' "$REPLY" | python3 -c 'import json, sys; print(json.dumps(sys.stdin.read()))')}]}") \
    || fail "title generation did not answer within $TASK_LIMIT_S s (set server defaults: see the README's Open WebUI section)"
TOOK=$(( $(date +%s) - STARTED ))
TITLE_TEXT=$(echo "$TITLE" | json 'd["choices"][0]["message"]["content"]')
[ -n "$TITLE_TEXT" ] || fail "empty title: $TITLE"
echo "ok: title generated in ${TOOK}s: ${TITLE_TEXT:0:80}"
echo "all checks passed"
