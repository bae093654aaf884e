#!/usr/bin/env bash
# Reproduce one result row of the papers end to end (docs/reproducing.md): first stages, preprocessing, stage 1,
# stage 2, re-ranking of every evaluation set x first stage, and the table against the paper's figures.
set -euo pipefail
usage() {
  cat <<'TXT'
usage: ./reproduce.sh ROW [-g gpus] [-t threads] [--dry-run] [--slurm] [--tiny] [--only STEP] [--holm] [key=value ...]
  ROW        a row of configs/reproduce/rows.yaml, e.g. ms-electra-KD-CL, se-electra, or the recipe that completes
             it (se-electra-stage2 = se-electra); a bad name lists the rows
  -g         GPU ids, e.g. 0 or 0,1,2,3 (training: torchrun, one process each), or cpu (default 0; --tiny: cpu)
  -t         CPU threads of the BM25 steps (default 16)
  --dry-run  print the plan: each step's command, its data (present / missing, where to get it), outputs and
             estimated GPU-hours; touches nothing
  --slurm    one sbatch job per step from slurm/, chained with --dependency=afterok (with --dry-run: printed)
  --tiny     the same chain on CPU in minutes (demo collection, tiny step counts); the table says it is a smoke run
  --only     run one step (its earlier steps must be done); what each --slurm job runs
  --holm     Holm-correct the table's p-values over the row
  key=value  config overrides added to every training step
A rerun skips every step whose recorded inputs and outputs match (runs/reproduce/steps/<step>.done.json).
TXT
}
[[ ${1:-} == -h || ${1:-} == --help ]] && { usage; exit 0; }
[[ $# -ge 1 ]] || { echo "error: command line: ROW is required (see $0 -h)" >&2; exit 2; }
cd "$(dirname "$0")"
exec python -m crossrank reproduce "$@"
