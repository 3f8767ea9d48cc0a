"""ftl: one fine-tuning recipe from a laptop CPU to a Slurm cluster."""

__version__ = "0.1.0"
