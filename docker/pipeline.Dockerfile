# A Ray node that runs replaymix's preprocessing jobs (pipeline/): use it for the head and the workers.
# Build from the repository root: docker build -f docker/pipeline.Dockerfile -t replaymix-pipeline .
FROM python:3.11-slim-bookworm

# man-db renders the man-page corpora; the pages themselves are the demo's English/German text.
# Debian stable's page versions move only with point releases, so they are left unpinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends man-db manpages manpages-dev manpages-de manpages-de-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/replaymix
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY service ./service
COPY trainer ./trainer
# The CPU build of PyTorch first, so the project's torch range cannot pull a CUDA build here.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
    && pip install --no-cache-dir .

ENV RAY_DISABLE_USAGE_STATS=1
EXPOSE 6379 8265 10001
CMD ["ray", "start", "--head", "--block", "--port=6379", "--dashboard-host=0.0.0.0"]
