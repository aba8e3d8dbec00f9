"""Everything that runs on Ray: the search driver, trials, the float baseline, and
the compression engine (pure torch, usable without Ray or the service)."""

import os

# sparq never phones home: MLflow's usage telemetry (a background thread that posts
# to the internet and mutates os.environ) stays off unless the user turns it on.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
