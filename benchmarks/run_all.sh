#!/usr/bin/env bash
# Every result table in the README, in one go (about 45 minutes on 2 CPU cores). Each finished seed is written
# to benchmarks/results/<scenario>/<strategy>.json as it completes.
set -euo pipefail
cd "$(dirname "$0")/.."
BAYESCL="${BAYESCL:-.venv/bin/bayescl}"
SEEDS="${SEEDS:-3}"
$BAYESCL bench --scenario split-mnist-task --seeds "$SEEDS" --epochs 5 --batch-size 64 --no-progress \
  --strategy naive joint laplace-diag laplace-kron ewc-online vcl vcl-coreset
$BAYESCL bench --scenario permuted-mnist --seeds "$SEEDS" --epochs 3 --batch-size 256 --no-progress --no-uncertainty \
  --strategy naive joint laplace-diag laplace-kron ewc-online vcl
$BAYESCL bench --scenario split-mnist-domain --seeds "$SEEDS" --epochs 5 --batch-size 64 --no-progress \
  --strategy naive joint laplace-diag laplace-kron ewc-online
$BAYESCL report benchmarks/results
