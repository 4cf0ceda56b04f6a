"""A Django host project wired to rational_billing (see README.md)."""
