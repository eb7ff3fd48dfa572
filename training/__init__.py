"""A training run's parts: its settings, its run folder, the weights it starts from, LoRA, the release."""
