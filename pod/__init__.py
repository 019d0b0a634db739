"""POD core: what every stage shares (IDs, templates, tokenization, the model, decoding, metrics)."""

__version__ = "0.1.0"

TASKS: tuple[str, ...] = ("explanation", "sequential", "topn")
"""Task order fixes the row of each task's continuous prompts and the task-alternation cycle."""
