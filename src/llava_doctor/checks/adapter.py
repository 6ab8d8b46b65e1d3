"""Checks: adapter (filled in by the check-catalogue work)."""
