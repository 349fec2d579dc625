#!/usr/bin/env bash
# Manual cluster, each GPU node:   RAY_AUTH_TOKEN=... bash cluster/start-worker.sh HEAD_IP[:PORT]
set -euo pipefail
: "${RAY_AUTH_TOKEN:?set RAY_AUTH_TOKEN to the head's token}"
export RAY_AUTH_MODE=token
head="${1:?usage: start-worker.sh HEAD_IP[:PORT]}"
[[ "$head" == *:* ]] || head="$head:6379"
ray start --address="$head" --num-gpus="$(nvidia-smi -L 2>/dev/null | wc -l)"
