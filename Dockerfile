# SPDX-License-Identifier: MIT
# The image every Python service of docker-compose.yml runs: the package with its demo extras
# (Flower among them) and the examples. Build context: the repository root (see .dockerignore).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app

WORKDIR /app

# The package first, so a change to the examples does not reinstall the dependencies.
COPY pyproject.toml README.md ./
COPY throttle ./throttle
RUN pip install ".[demo]"

COPY examples ./examples

# Nothing here needs root; Celery warns when a worker runs as root.
RUN useradd --create-home --uid 10001 app
USER app
