# workorder-operator image: `docker build -t workorder-operator:0.1.0 .` (deploy/ expects that tag).
# Two stages: the first builds the wheel and installs it with the operator's dependencies (the
# `operator` extra; the base install is only the SDK and CLI) into a virtualenv;
# the second is a clean python image with only that virtualenv (no pip cache, no sources, no
# build tools) and runs as the non-root user 65532 that deploy/ also sets.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
# Only what the wheel needs (see .dockerignore): the project metadata and the package.
COPY pyproject.toml README.md ./
COPY operator/ operator/
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install "$(ls /wheels/*.whl)[operator]" \
 && /opt/venv/bin/pip uninstall --yes pip

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 65532 nonroot \
 && useradd --system --uid 65532 --gid 65532 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin nonroot
# Same path as in the build stage: a virtualenv's scripts name their interpreter by absolute path.
COPY --from=build /opt/venv /opt/venv
# Bytecode was compiled at install time; the root filesystem is read-only in the cluster.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["workorder-operator"]
CMD ["--all-namespaces"]
