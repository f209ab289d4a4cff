#!/usr/bin/env bash
# The GPU checks, as one command on a lent GPU machine (after benchmarks/gpu/prepare.sh here):
#   run(command="bash benchmarks/gpu/check.sh", carry=[".gpu"], timeout_s=500)
# Benchmarks 5 and 6 on CUDA, `ragsweep train` of four methods on the demo spec, then the
# trainers' tests (tiny models) on CUDA. Each part's output comes back in $OUT; about 5 minutes.
# SKIP_BENCH=1 skips the benchmarks; TESTS_S bounds the tests' seconds (default 200).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 \
    TQDM_DISABLE=1 RAGSWEEP_CACHE=/tmp/ragsweep-cache
start=$(date +%s)
part() { echo "== $1 at +$(($(date +%s) - start)) s"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/env.txt"
python3 -c "import torch, transformers, peft, sentence_transformers, faiss
print(torch.__version__, transformers.__version__, peft.__version__, sentence_transformers.__version__, faiss.__version__)" \
    2>&1 | tail -1 | tee -a "$OUT/env.txt"
python3 benchmarks/gpu/make_models.py .gpu/models "$RAGSWEEP_CACHE" /tmp/minilm 2>&1 | tail -1
sed 's#embedder: minilm#embedder: /tmp/minilm#' studies/demo.yaml > /tmp/demo-gpu.yaml
[ -z "${SKIP_BENCH:-}" ] && {
  part "trainer efficiency, bf16"
  timeout 90 python3 benchmarks/trainer_efficiency.py --device cuda --repeats 10
  part "trainer efficiency, bf16, 32 x 1024"
  timeout 90 python3 benchmarks/trainer_efficiency.py --device cuda --repeats 10 --batch 32 --sequence 1024
  part "trainer efficiency, fp32"
  timeout 90 python3 benchmarks/trainer_efficiency.py --device cuda --precision fp32 --repeats 10
  part "batched RAG losses"
  timeout 120 python3 benchmarks/batched_rag.py --device cuda --repeats 5 --spec /tmp/demo-gpu.yaml
} 2>&1 | grep -v "^Loading" | tee "$OUT/bench.txt"
for method in rag_token two_phase independent rag_sequence; do
  part "train $method"
  timeout 90 python3 -c 'import sys; from search.cli import main; sys.argv[0] = "ragsweep"; main()' \
      train --spec /tmp/demo-gpu.yaml --method $method --lr-embedder 1e-5 --lr-generator 1e-4 \
      --json > "$OUT/train-$method.json" 2> /tmp/train-$method.err
  echo "rc=$?"; tail -c 400 /tmp/train-$method.err
done 2>&1 | tee "$OUT/train.txt"
part tests
unset RAGSWEEP_CACHE
timeout "${TESTS_S:-200}" python3 -m pytest -q -p no:cacheprovider -o addopts="" -n 8 \
    --dist loadgroup -m "not slow and not alone" tests/trainers 2>&1 | tee "$OUT/tests.txt" | tail -40
part done
