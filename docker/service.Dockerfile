# The streaming mixer service (service/). Datasets and the state dir are mounted volumes.
# Build from the repository root: docker build -f docker/service.Dockerfile -t replaymix-service .
FROM python:3.11-slim-bookworm

WORKDIR /opt/replaymix
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY service ./service
COPY trainer ./trainer
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
    && pip install --no-cache-dir .

RUN useradd --create-home --uid 10001 mixer
USER 10001
EXPOSE 8000
# Arguments (datasets, weights, state dir, token file) come from the compose file or `docker run`.
ENTRYPOINT ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"]
