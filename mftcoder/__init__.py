"""mftcoder: multi-task fine-tuning for code LLMs."""

__version__ = "0.1.0"
