#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.sh installs on a GPU machine that reaches no registry: deepspeed, mlflow,
# webdataset and every package of ours they need that the machine's image lacks, for its Python 3.12 on
# x86-64, into .whl/ (keep .whl/ out of git: `echo /.whl/ >> .git/info/exclude`).
#
#   benchmarks/gpu_wheels.sh            # from the repository root, with the venv built (make venv)
#
# The versions are this venv's. The image already holds torch, torchvision, timm, numpy, pandas, pyyaml,
# psutil, tqdm, matplotlib, pillow, requests and the like; NEEDED lists what it lacks (read from its package
# list). DeepSpeed ships as source only: its wheel is built here (pure Python; its ops build on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
NEEDED="alembic annotated-types blinker braceexpand cachetools cffi cryptography databricks-sdk docker fastapi
flask flask-cors gitdb gitpython google-auth graphene graphql-core graphql-relay gunicorn hjson httpcore2 httpx2
huey importlib-metadata itsdangerous mako mlflow mlflow-skinny mlflow-tracing opentelemetry-api
opentelemetry-proto opentelemetry-sdk opentelemetry-semantic-conventions prettytable pyasn1 pyasn1-modules
pycparser pydantic pydantic-core python-dotenv skops smmap sqlalchemy sqlparse starlette truststore
typing-inspection uvicorn wcwidth webdataset"
pins=$(.venv/bin/python - "$NEEDED" <<'EOF'
import re, sys
from importlib.metadata import distributions
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
installed = {norm(d.metadata["Name"]): d.version for d in distributions()}
missing = [n for n in sys.argv[1].split() if norm(n) not in installed]
if missing:
    sys.exit(f"not in the venv: {' '.join(missing)} (make venv first)")
print(" ".join(f"{n}=={installed[norm(n)]}" for n in sys.argv[1].split()))
EOF
)
mkdir -p .whl
platforms=""
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_27_x86_64 manylinux_2_28_x86_64 \
         manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux1_x86_64; do
  platforms="$platforms --platform $p"
done
# shellcheck disable=SC2086  # the pins and platforms are lists of words
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
  -d .whl $pins
ds=$(.venv/bin/python -c "from importlib.metadata import version; print(version('deepspeed'))")
(cd /tmp && DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation "deepspeed==$ds" -w "$OLDPWD/.whl")
echo "$(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/"
