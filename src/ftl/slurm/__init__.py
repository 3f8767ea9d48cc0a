"""Slurm: render the sbatch templates in slurm/ from a recipe, submit, watch, cancel, requeue."""
