# The kubetask image: the operator by default; workers build FROM it and add their code, e.g.
#   FROM kubetask:0.1.0
#   COPY myapp/ /app/myapp/
#   CMD ["worker", "myapp.tasks:worker"]
FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY sdk/ sdk/
COPY operator/ operator/
COPY cli/ cli/
RUN pip install --no-cache-dir . && rm -rf /root/.cache

# Any non-root user works: the operator only talks to the API server.
USER 65532:65532
ENTRYPOINT ["kubetask"]
CMD ["operator", "--liveness", "http://0.0.0.0:8080/healthz"]
