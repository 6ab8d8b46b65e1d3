#!/usr/bin/env bash
# The prepared GPU run of issue 14, for a session lent a GPU machine (the tool library's `device`
# entry): the CUDA merge of a llama-7b-shaped LLaVA run, generated on that machine, against the
# same floors (cp -r; torch import + every B @ A on the GPU) and peft's pipeline on the GPU, in
# paired rounds. One command, about 8-10 minutes on an H200 machine (16 cores): the build
# (13.5 GB of random weights) and REPEAT rounds of four jobs.
#
# That machine's python3 has torch (CUDA), transformers, peft, safetensors, typer and rich, but
# not pydantic, sarif-pydantic or junitparser: carry their wheels in .whl (bench/merge.md, "GPU",
# has the download line), e.g.
#   device run: command="bash bench/gpu_merge.sh", carry=[".whl"], timeout_s=600
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out=${OUT:-bench/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 bench/bench_merge.py --shape 7b --device cuda --repeat "${REPEAT:-3}" \
    --dir /tmp/llava-doctor-bench/merge 2>&1 | tee "$out/gpu-merge.txt"
