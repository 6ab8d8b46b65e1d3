"""Importing this module registers every fixer (one module per concern)."""

from llava_doctor.fixes import (  # noqa: F401
    adapter_config,
    config_fields,
    hf,
    missing_files,
    naming,
    non_lora_keys,
)
