#!/usr/bin/env bash
# Wrapper of benchmarks/gpu_check.py for the lent GPU machine (see that file's docstring):
# installs the wheels carried in .whl/ (grain and its two missing dependencies) into /tmp/site,
# puts the repository root on PYTHONPATH, runs the check and tees its output to
# <results>/gpu_check.log. Arguments go to gpu_check.py (--results DIR, --only ITEMS, ...).
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
results=benchmarks/results/gpu
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  [[ ${args[i]} == --results ]] && results=${args[i + 1]}
  [[ ${args[i]} == --results=* ]] && results=${args[i]#--results=}
done
mkdir -p "$results"
"$PY" benchmarks/gpu_check.py "$@" 2>&1 | tee "$results/gpu_check.log"
