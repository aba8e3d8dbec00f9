# sparq service image (CPU): the REST API, the job launcher and the search
# drivers it starts (one subprocess per job, each a Ray driver). compose.yaml
# also runs the MLflow server and the Ray head from this image.
#
# Build from the repository root, with a wheel source that serves the CPU build
# of torch (the PyTorch CPU wheel index or a mirror of it):
#
#   docker build -f docker/service.Dockerfile \
#     --build-arg PIP_EXTRA_INDEX_URL=<CPU torch wheel index> -t sparq-service .
#
# No index is named in this file. pip reads PIP_INDEX_URL / PIP_EXTRA_INDEX_URL
# from the build args below; with the CPU index as the extra index, pip prefers
# 2.13.0+cpu over PyPI's 2.13.0 (a local version sorts higher). The build fails
# if it ends up with a CUDA build, or with any torch other than 2.13.0.
#
# Every container of one Ray cluster needs the same Ray and the same Python
# (Ray compares the patch version): build this image and worker.Dockerfile with
# the same PYTHON_VERSION and RAY_VERSION, from the same base pull.

ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

ARG PIP_INDEX_URL=""
ARG PIP_EXTRA_INDEX_URL=""
ARG RAY_VERSION=2.60.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    RAY_USAGE_STATS_ENABLED=0

RUN python -m venv /opt/venv

# 1. torch first, pinned, CPU build. An empty build arg would reach pip as an
#    empty index URL (no index at all), so unset ones are dropped.
RUN [ -n "$PIP_INDEX_URL" ] || unset PIP_INDEX_URL; \
    [ -n "$PIP_EXTRA_INDEX_URL" ] || unset PIP_EXTRA_INDEX_URL; \
    pip install torch==2.13.0 \
 && python -c "import sys, torch; v = torch.__version__; ok = v.split('+')[0] == '2.13.0' and torch.version.cuda is None; sys.exit(0 if ok else f'the service image needs the CPU build of torch 2.13.0, got {v} (CUDA {torch.version.cuda}); pass a CPU wheel source in PIP_INDEX_URL or PIP_EXTRA_INDEX_URL')"

# 2. the project; torch>=2.4 is already satisfied, so pip keeps the CPU build.
#    psycopg: the job store and MLflow on PostgreSQL; boto3: MLflow's S3 artifacts.
WORKDIR /opt/sparq
COPY pyproject.toml README.md ./
COPY service ./service
COPY search_spaces ./search_spaces
COPY workers ./workers
COPY dashboards ./dashboards
RUN [ -n "$PIP_INDEX_URL" ] || unset PIP_INDEX_URL; \
    [ -n "$PIP_EXTRA_INDEX_URL" ] || unset PIP_EXTRA_INDEX_URL; \
    pip install . "ray[default,tune]==${RAY_VERSION}" "psycopg[binary]>=3.2" "boto3>=1.34" \
 && python -c "import sys, torch; v = torch.__version__; ok = v.split('+')[0] == '2.13.0' and torch.version.cuda is None; sys.exit(0 if ok else f'installing the project replaced torch: {v}')" \
 && rm -rf /opt/sparq
WORKDIR /

COPY docker/entrypoint.sh /usr/local/bin/sparq-entrypoint
RUN chmod 0755 /usr/local/bin/sparq-entrypoint \
 && groupadd --system --gid 10001 sparq \
 && useradd --system --uid 10001 --gid sparq --home-dir /home/sparq --create-home \
        --shell /usr/sbin/nologin sparq \
 && mkdir -p /data \
 && chown sparq:sparq /data

# Job store (unless SPARQ_DATABASE_URL), job directories, checkpoints. In a Ray
# cluster this must be the same shared path on every node (Tune writes trial
# checkpoints there); compose.yaml mounts one volume at /data everywhere.
ENV SPARQ_HOME=/data
USER sparq
WORKDIR /home/sparq
EXPOSE 8000

ENTRYPOINT ["sparq-entrypoint"]
# The API only: MLflow and Ray are external (SPARQ_MLFLOW_TRACKING_URI,
# SPARQ_RAY_ADDRESS), the job store is SPARQ_DATABASE_URL. Exactly one uvicorn
# worker process: the job launcher lives in it.
CMD ["uvicorn", "--factory", "service.api:app_factory", "--host", "0.0.0.0", "--port", "8000"]
