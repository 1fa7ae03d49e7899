"""dpllm: differentially private fine-tuning of language models with gradient denoising."""

__version__ = "0.1.0"
