# fedstream in a container: `docker compose up --build` runs the cluster of
# docker-compose.yml; `docker run fedstream client --server HOST:50051 ...` runs one process.
#
# Builds on any Debian-like image with Python 3.11 (ARG BASE): the slim Python image by
# default, or the Debian base `make base-image` builds where no registry is reachable.
# With wheels in wheels/ (`make wheelhouse`) it installs from them alone and builds with
# `--network none`; without, from the package index. See docs/containers.md.
ARG BASE=python:3.11-slim

# The venv is built in a stage of its own, so the wheelhouse copied in for it never
# reaches the final image's layers.
FROM ${BASE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# Debian's own Python refuses a system-wide pip install (PEP 668): everything goes into
# a venv, first on PATH.
RUN python3 -m venv /opt/venv

WORKDIR /src
COPY constraints.txt ./
COPY wheels ./wheels

# torch first, in a layer of its own that a change to fedstream's sources leaves cached.
# constraints.txt pins it; without a wheelhouse the PyTorch CPU index supplies that
# version as a CPU-only wheel (2.x.y+cpu sorts above PyPI's CUDA build).
RUN if ls wheels/*.whl >/dev/null 2>&1; then \
        set -- --no-index --find-links wheels; \
    else \
        set -- --extra-index-url https://download.pytorch.org/whl/cpu; \
    fi \
    && pip install "$@" -c constraints.txt torch

COPY pyproject.toml README.md ./
COPY protos ./protos
COPY common ./common
COPY server ./server
COPY client ./client
COPY tasks ./tasks
COPY fedstream ./fedstream

# The import check runs from / so that it sees the installed package, not the source
# folder fedstream/ of the working directory (which lacks fedstream.common and the rest).
RUN if ls wheels/*.whl >/dev/null 2>&1; then \
        set -- --no-index --find-links wheels; \
    else \
        set -- --extra-index-url https://download.pytorch.org/whl/cpu; \
    fi \
    && pip install "$@" -c constraints.txt . \
    && cd / && python -c "import fedstream.cli, fedstream.server.daemon, torch; assert not torch.version.cuda, torch.version.cuda"

FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

COPY --from=build /opt/venv /opt/venv

# Run unprivileged. /runs and /certs are where the compose file mounts its named volumes;
# creating them here makes a fresh volume belong to this user (so `fedstream certs` can
# write the certificates, and the keys it makes 0600 stay readable to the server and
# clients, which run as the same user).
RUN useradd --create-home --uid 1000 fedstream \
    && mkdir /runs /certs \
    && chown fedstream:fedstream /runs /certs
USER fedstream
WORKDIR /home/fedstream

# A server container that sets FEDSTREAM_HEALTH_RUN_DIR to its --run-dir is healthy while
# `fedstream status` reads its status page (the address is in RUN_DIR/coordinator.json;
# FEDSTREAM_STATUS_CA, _CERT and _KEY give the credentials of a page behind mutual TLS).
# Any other container (a client, `certs`) is checked for its fedstream starting at all.
HEALTHCHECK --interval=10s --timeout=15s --start-period=60s --retries=3 \
    CMD if [ -n "$FEDSTREAM_HEALTH_RUN_DIR" ]; then \
            fedstream status "$FEDSTREAM_HEALTH_RUN_DIR" >/dev/null; \
        else \
            fedstream --help >/dev/null; \
        fi

EXPOSE 50051
ENTRYPOINT ["fedstream"]
CMD ["--help"]
