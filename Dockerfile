# One image for every pool: the command picks the pool (see compose.yaml).
FROM python:3.12-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY tierfleet tierfleet
COPY workers workers
COPY producers producers
COPY schemas schemas
COPY migrations migrations
COPY examples examples
RUN pip install '.[backends]'
USER nobody
ENTRYPOINT ["tierfleet"]
CMD ["--help"]
