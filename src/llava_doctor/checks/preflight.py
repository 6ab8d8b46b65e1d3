"""Checks: preflight (filled in by the check-catalogue work)."""
