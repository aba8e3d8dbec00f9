#!/bin/sh
# Entrypoint of the sparq service image (the same image runs the MLflow server and
# the Ray head in compose.yaml; for them it only execs the command).
#
# 1. Serving the API (command `uvicorn ...`) needs bearer tokens: the container
#    listens on 0.0.0.0, and like `sparq up` we refuse to serve that without
#    SPARQ_API_TOKENS (set SPARQ_ALLOW_NO_AUTH=1 to override, e.g. behind an
#    authenticating proxy).
# 2. A Ray driver must run on a Ray node: `ray.init(address=...)` looks for a
#    raylet on its own host. The search drivers the launcher starts here call
#    `ray.init(address=$SPARQ_RAY_ADDRESS)`, so when that is set this container
#    first joins the cluster as a node with no CPUs or GPUs (nothing is
#    scheduled on it; it only hosts the drivers).
set -eu

if [ "${1:-}" = "uvicorn" ]; then
    if [ -z "${SPARQ_API_TOKENS:-}" ] && [ "${SPARQ_ALLOW_NO_AUTH:-0}" != "1" ]; then
        echo "sparq: refusing to serve on 0.0.0.0 without SPARQ_API_TOKENS" \
            "(comma separated, 16+ characters each)" >&2
        exit 2
    fi
    case "${SPARQ_RAY_ADDRESS:-}" in
    "" | ray://*) ;;  # a local Ray per driver, or Ray Client: no node needed here
    *)
        # The node's raylet and workers inherit this environment: not the secrets
        # only the API and the drivers need (see service/secrets.py).
        env -u SPARQ_API_TOKENS -u SPARQ_DATABASE_URL \
            ray start --address="${SPARQ_RAY_ADDRESS}" --num-cpus=0 --num-gpus=0 \
            --disable-usage-stats
        ;;
    esac
fi

exec "$@"
