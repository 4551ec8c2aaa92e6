"""The deprecation warnings every default run printed, fixed where they start.

- `gradient_checkpointing` -> `activation_checkpointing` (transformers 5): TRL's configs still declare the old name
  (default True), so every GRPOConfig warns. `resolve_config_aliases` copies the old field into the new one before
  TrainingArguments looks, exactly as transformers would, minus the warning; both names keep working.
- `pin_memory` with no accelerator (torch's DataLoader): pinning only helps host-to-GPU copies, so it is switched
  off when torch finds no accelerator.
- `is_gradient_checkpointing`, `gradient_checkpointing_disable/enable` (transformers 5): called by TRL 1.16 itself
  around every generation; nothing of ours calls them, so only those exact messages are silenced
  (`silence_dependency_warnings`).
"""

from __future__ import annotations

import warnings

import torch

# (category, message regex) of warnings raised inside a dependency by a dependency's own call.
DEPENDENCY_WARNINGS = tuple((FutureWarning, rf"`{name}` is deprecated") for name in (
    "is_gradient_checkpointing", "gradient_checkpointing_disable", "gradient_checkpointing_enable"))


def silence_dependency_warnings() -> None:
    for category, message in DEPENDENCY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def resolve_config_aliases(config) -> None:
    """Call at the start of a TrainingArguments subclass's __post_init__ (before super's)."""
    for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                     ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
        if hasattr(config, new) and getattr(config, new) is None and getattr(config, old) is not None:
            setattr(config, new, getattr(config, old))
    if config.dataloader_pin_memory and not torch.accelerator.is_available():
        config.dataloader_pin_memory = False
