# The mirror as a container image: slim Python, non-root, data in a volume.
#   docker build -t mirror .
#   docker run -d -p 5000:5000 -v mirror-data:/var/lib/mirror mirror
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mirror ./mirror
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
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
