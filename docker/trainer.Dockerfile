# A CUDA trainer worker (trainer/) that pulls batches from the mixer service.
# Build from the repository root: docker build -f docker/trainer.Dockerfile -t replaymix-trainer .
FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime

WORKDIR /opt/replaymix
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY service ./service
COPY trainer ./trainer
# The image's CUDA torch already satisfies the project's range, so pip keeps it.
RUN pip install --no-cache-dir .

ENTRYPOINT ["python", "-m", "trainer"]
