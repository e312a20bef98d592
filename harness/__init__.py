"""harness: distributed fine-tuning of pre-trained encoders for sequence classification."""

__version__ = "0.1.0"
