#!/usr/bin/env bash
# Both benchmarks on a GPU machine that reaches no registry and receives 64 MiB: a randomly initialised model of
# the embedded model's config, the wheels it lacks, and the HH sample travel in ignored folders. Prepare here:
#   mkdir -p .gpu/smollm2 && cp ~/.cache/dpo-space/smollm2-135m-instruct-q4_1/{*.json,*.jinja} .gpu/smollm2/
#   cp ../shared/data/hh-rlhf/harmless-base-test.sample2000.jsonl.gz .gpu/
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl \
#       trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 transformers==5.24.0 peft==0.21.2
# then run `bash bench/gpu.sh` there with .gpu and .whl carried; results land in $OUT (or bench/results/gpu).
set -euo pipefail
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, trl, peft; print(torch.__version__, transformers.__version__, trl.__version__, peft.__version__)"
python3 -m bench.random_weights .gpu/smollm2 /tmp/smollm2-random
python3 -m bench.serve --model /tmp/smollm2-random --in-process --out "$OUT/serve.json" 2>&1 | grep -v Warning || echo "bench.serve failed"
python3 -m bench.train --model /tmp/smollm2-random --data .gpu/harmless-base-test.sample2000.jsonl.gz \
    --pairs 256 --eval-pairs 100 --out "$OUT/train.json" 2>&1 | grep -v Warning
