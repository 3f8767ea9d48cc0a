"""Model and tokenizer building: tiny from a config, real models from pip-shipped weights or a folder."""
