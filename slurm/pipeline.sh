#!/bin/bash
# Stages as separate jobs, each starting only when the one before it succeeded (afterok). A failed
# stage's dependants are cancelled by Slurm (--kill-on-invalid-dep), so none waits forever.
#
#   slurm/pipeline.sh PROFILE RECIPE [RECIPE ...]
#   slurm/pipeline.sh tiny recipes/sft_chat.yaml recipes/qlora_single.yaml
#   FTL_SBATCH_ARGS="--gpus-per-node=4 --time=2:00:00" slurm/pipeline.sh node8 a.yaml b.yaml
#
# FTL_SBATCH_ARGS: sbatch options for every stage; they override train_node.sbatch's #SBATCH defaults
# (a CUDA stage then runs one rank per GPU --gpus-per-node grants).
#
# This chains independent recipes. `ftl pipeline PIPELINE.yaml --profile P --slurm` does the same for a
# pipeline file and also hands each stage's model to the next, merges adapters and skips stages whose
# recipe and inputs are unchanged since they completed.
set -euo pipefail
profile=$1
shift
template="$(dirname "$0")/train_node.sbatch"   # sbatch copies it: any working directory will do
read -r -a sbatch_args <<< "${FTL_SBATCH_ARGS:-}"
previous=""
for recipe in "$@"; do
  dependency=()
  if [ -n "$previous" ]; then dependency=(--dependency="afterok:$previous"); fi
  previous=$(sbatch --parsable --kill-on-invalid-dep=yes "${dependency[@]}" "${sbatch_args[@]}" \
    "$template" "$recipe" "$profile")
  echo "$recipe: job $previous${dependency:+ (after ${dependency[0]#--dependency=})}"
done
