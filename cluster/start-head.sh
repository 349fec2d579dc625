#!/usr/bin/env bash
# Manual cluster, head node:   RAY_AUTH_TOKEN=... bash cluster/start-head.sh
# Token authentication is on: every node and every driver needs the same RAY_AUTH_TOKEN
# (generate one with `ray get-auth-token --generate`, keep it out of version control).
set -euo pipefail
: "${RAY_AUTH_TOKEN:?set RAY_AUTH_TOKEN (ray get-auth-token --generate)}"
export RAY_AUTH_MODE=token
ray start --head --port="${RAY_PORT:-6379}" --num-gpus="$(nvidia-smi -L 2>/dev/null | wc -l)" --include-dashboard=false
