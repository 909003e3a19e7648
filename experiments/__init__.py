"""Entry points and configs (not part of the installed library)."""
