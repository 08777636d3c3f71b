#!/usr/bin/env bash
# Talks to a running `drllm serve` with curl: health, models, a chat completion (with its
# routing information), the same streamed, the path alone, the routers, metrics.
#   examples/curl.sh [BASE_URL]      (default http://127.0.0.1:8088; DRLLM_API_KEY if set)
set -euo pipefail
base="${1:-http://127.0.0.1:8088}"
auth=()
[ -n "${DRLLM_API_KEY:-}" ] && auth=(-H "Authorization: Bearer $DRLLM_API_KEY")

echo "== health";  curl -sS "$base/health"; echo
echo "== models";  curl -sS "${auth[@]}" "$base/v1/models"; echo

echo "== chat completion (routing information in .drllm)"
curl -sS "${auth[@]}" "$base/v1/chat/completions" -H 'Content-Type: application/json' -d '{
  "messages": [{"role": "user", "content": "Name three primary colours."}],
  "max_tokens": 40, "temperature": 0
}'
echo

echo "== streamed, with a depth bias (> 0 keeps more blocks) and usage at the end"
curl -sS -N "${auth[@]}" "$base/v1/chat/completions" -H 'Content-Type: application/json' -d '{
  "messages": [{"role": "user", "content": "Say hello in French."}],
  "max_tokens": 20, "stream": true, "stream_options": {"include_usage": true},
  "depth_bias": 0.5
}'
echo

echo "== the path the routers choose for a prompt, without generating"
curl -sS "${auth[@]}" "$base/v1/route" -H 'Content-Type: application/json' -d '{
  "messages": [{"role": "user", "content": "What is 2 + 2?"}]
}'
echo

echo "== routers in service, then a reload (the daemon also reloads by itself when the file changes)"
curl -sS "${auth[@]}" "$base/v1/routers"; echo
curl -sS "${auth[@]}" -X POST "$base/v1/routers/reload"; echo

echo "== metrics (first lines)"
curl -sS "${auth[@]}" "$base/metrics" | head -20
