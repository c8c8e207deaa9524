# The mirror as a container image: slim Python, non-root, data in a volume.
#   docker build -t mirror .
#   docker run -d -p 5000:5000 -v mirror-data:/var/lib/mirror mirror
# Behind a private package index: --build-arg PIP_INDEX_URL=https://pypi.example/simple. Offline,
# from a directory of wheels (podman/buildah can mount it into the build):
#   podman build -v $PWD/wheels:/wheelhouse:ro --build-arg PIP_NO_INDEX=1 \
#     --build-arg PIP_FIND_LINKS=/wheelhouse -t mirror .
# Those settings live only in the build stage: the final image's history does not name them.
FROM docker.io/library/python:3.11-slim AS build
ARG PIP_INDEX_URL
ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mirror ./mirror
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM docker.io/library/python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /var/lib/mirror mirror \
 && mkdir -p /var/lib/mirror && chown 10001:10001 /var/lib/mirror
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index /wheels/*.whl && rm -rf /wheels
USER 10001:10001
VOLUME ["/var/lib/mirror"]
EXPOSE 5000
# The admin listener's /healthz: plain http on loopback even when the registry port has TLS.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:5001/healthz', timeout=4)"]
ENTRYPOINT ["mirror", "serve"]
CMD ["--listen", "0.0.0.0:5000", "--data", "/var/lib/mirror"]
