# The handoff service: gRPC on 50051, Brevo's webhooks and the probes on 8080.
#
#   docker build -t brevo-handoff:0.1.0 .
#   docker run --rm -p 50051:50051 -p 8080:8080 brevo-handoff:0.1.0   # against the sandbox
#
# Kubernetes manifests: deploy/kubernetes/ (their README says how the two fit together).

ARG PYTHON_IMAGE=python:3.11-slim

# --- build: generate the gRPC stubs, install the project into /opt/venv -------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src

# The stubs are generated from protos/ and never committed. grpcio-tools is pinned as in
# pyproject.toml's dependencies, mypy-protobuf as in its dev extra (gen_stubs.py also writes
# the typed .pyi files); both stay in this stage.
RUN pip install grpcio-tools==1.85.1 mypy-protobuf==5.1.0
COPY protos/ protos/
COPY scripts/gen_stubs.py scripts/gen_stubs.py
RUN python scripts/gen_stubs.py

COPY pyproject.toml README.md ./
COPY service/ service/
COPY gateway/ gateway/
# -I: import from the installed package, not from /src.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install . \
    && /opt/venv/bin/python -I -c "import service.rpc.generated.handoff.v1.handoff_pb2_grpc"

# --- runtime: the virtual environment and nothing else, as an unprivileged user -----------
FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HANDOFF_SQLITE_PATH=/data/handoff.db

# Numeric ids, so that Kubernetes' runAsNonRoot can check them. /data holds the SQLite file
# (a volume in Kubernetes); nothing else is written, so the root filesystem can be read-only.
RUN groupadd --system --gid 10001 handoff \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin handoff \
    && mkdir /data \
    && chown 10001:10001 /data
COPY --from=build /opt/venv /opt/venv

USER 10001:10001
EXPOSE 50051 8080
ENTRYPOINT ["python", "-m", "service"]
