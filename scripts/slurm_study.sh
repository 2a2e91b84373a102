#!/usr/bin/env bash
# Run one cell of a study as one task of a SLURM job array: line $SLURM_ARRAY_TASK_ID of a
# file of cell lines printed by the study itself, e.g. from the repository root
#
#   python -m experiments.table1 --source data/cifar10-jpeg.tar.gz --gpus 0 --print-commands > cells.txt
#   sbatch --array=1-$(wc -l < cells.txt) scripts/slurm_study.sh cells.txt
#
# Each line trains its cell to the end, or resumes it, or does nothing when it is done or held
# by another task (a claim per cell in <out-dir>/.work/locks, which needs a file system with
# flock shared by the nodes). Re-submitting the same array after a preemption continues every
# cut cell. --gpus 0 in the study means the first GPU SLURM gives each task.
#SBATCH --job-name=mimicnorm-cell
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=4
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --signal=B:TERM@120
set -euo pipefail
list="${1:?usage: sbatch --array=1-N scripts/slurm_study.sh CELLS_FILE}"
line="$(sed -n "${SLURM_ARRAY_TASK_ID:?not in a SLURM job array}p" "$list")"
if [ -z "$line" ]; then
    echo "error: $list has no line ${SLURM_ARRAY_TASK_ID}" >&2
    exit 2
fi
cd "${SLURM_SUBMIT_DIR:-.}"
exec bash -c "$line"
