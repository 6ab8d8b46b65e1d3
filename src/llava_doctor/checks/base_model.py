"""Checks: base_model (filled in by the check-catalogue work)."""
