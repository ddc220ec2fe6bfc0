# pocketpacs: DICOM listener (11112) and, in a second process it starts, HTTP server (8000).
# docker-compose.yml runs it with MinIO and PostgreSQL; see docs/deployment.md.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src

# Dependencies first, in their own layer, so a code change does not download them again.
# Every dependency has a binary wheel for linux/amd64 and Python 3.11: no compiler needed.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The package itself (.dockerignore lets in only what `pip install .` needs).
COPY . .
RUN pip install --no-deps . \
    && cd / && rm -rf /src

# Unprivileged user; /data is created and owned by it before it becomes a volume, so a
# new named volume starts out writable by it.
RUN useradd --system --uid 10001 --user-group --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin pocketpacs \
    && mkdir /data \
    && chown pocketpacs:pocketpacs /data

# /data holds the ingest spool (instances acknowledged to senders but not yet in the
# bucket) and, without external services, the embedded S3 data and the SQLite index.
# It must be persistent: a restarted container replays its spool from here.
ENV POCKETPACS_DATA_DIR=/data
VOLUME ["/data"]
WORKDIR /data
USER pocketpacs

EXPOSE 11112 8000

# 200 only when the object store, the index and the ingest spool all work (503 otherwise).
# The proxy handler is emptied so an HTTP_PROXY setting cannot capture 127.0.0.1.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:%s/healthz' % os.environ.get('POCKETPACS_HTTP_PORT', '8000'), timeout=4)"]

# SIGTERM (docker stop) stops pocketpacs cleanly: it closes the DICOM listener and drains
# the spool for up to 30 s, so give it a stop timeout of about 60 s.
ENTRYPOINT ["pocketpacs"]
CMD ["serve", "--host", "0.0.0.0", "--data-dir", "/data"]
