"""Checks: projector (filled in by the check-catalogue work)."""
