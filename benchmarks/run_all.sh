#!/usr/bin/env bash
# Every result table in the README, in one go (about 2 hours on 2 CPU cores). Each finished seed is written
# to benchmarks/results/<scenario>/<strategy>.json as it completes.
set -euo pipefail
cd "$(dirname "$0")/.."
BAYESCL="${BAYESCL:-.venv/bin/bayescl}"
SEEDS="${SEEDS:-3}"
$BAYESCL bench --scenario split-mnist-task --seeds "$SEEDS" --epochs 5 --batch-size 64 --no-progress \
  --strategy naive joint laplace-diag laplace-kron laplace-kron-lowrank ewc-online vcl vcl-coreset
$BAYESCL bench --scenario permuted-mnist --seeds "$SEEDS" --epochs 3 --batch-size 256 --no-progress --no-uncertainty \
  --strategy naive joint laplace-diag laplace-kron laplace-kron-lam10 ewc-online
# permuted MNIST with 10 epochs per task (vcl: ~12 minutes a seed; joint and vcl with a 200/task coreset: 1 seed)
$BAYESCL bench --scenario permuted-mnist --seeds "$SEEDS" --epochs 10 --batch-size 256 --no-progress --no-uncertainty \
  --strategy laplace-kron-lam10 naive vcl --out benchmarks/results/epochs-10
$BAYESCL bench --scenario permuted-mnist --seeds 1 --epochs 10 --batch-size 256 --no-progress --no-uncertainty \
  --strategy joint "benchmarks/grids/vcl.yaml#vcl-coreset-200-s10" --out benchmarks/results/epochs-10
$BAYESCL bench --scenario split-mnist-domain --seeds "$SEEDS" --epochs 5 --batch-size 64 --no-progress \
  --strategy naive joint laplace-diag laplace-kron ewc-online
$BAYESCL report benchmarks/results
