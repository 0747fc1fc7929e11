# fedstream in a container: `docker compose up --build` runs the cluster of
# docker-compose.yml; `docker run fedstream client --server HOST:50051 ...` runs one process.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/fedstream
COPY pyproject.toml README.md constraints.txt ./
COPY protos ./protos
COPY common ./common
COPY server ./server
COPY client ./client
COPY tasks ./tasks
COPY fedstream ./fedstream

# The import check runs from / so that it sees the installed package, not the source
# folder fedstream/ of the working directory (which lacks fedstream.common and the rest).
# constraints.txt pins torch; the PyTorch CPU index supplies that version as a CPU-only
# wheel (2.x.y+cpu sorts above PyPI's CUDA build), which keeps the image small.
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu \
        -c constraints.txt . \
    && cd / && python -c "import fedstream.cli, fedstream.server.daemon, torch; assert not torch.version.cuda, torch.version.cuda"

# Run unprivileged. /runs and /certs are where the compose file mounts its named volumes;
# creating them here makes a fresh volume belong to this user (so `fedstream certs` can
# write the certificates, and the keys it makes 0600 stay readable to the server and
# clients, which run as the same user).
RUN useradd --create-home --uid 1000 fedstream \
    && mkdir /runs /certs \
    && chown fedstream:fedstream /runs /certs
USER fedstream
WORKDIR /home/fedstream

EXPOSE 50051
ENTRYPOINT ["fedstream"]
CMD ["--help"]
