# A Prefect process worker with the project installed: it runs the flows.
# For GPUs, start FROM an image with CUDA and install the CUDA build of torch
# instead of the CPU pin in constraints.txt.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends gcc git openssh-client \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/dpoflow
COPY . .
RUN pip install --no-cache-dir -c constraints.txt -e .
