"""A Flask host app wired to rational_billing (see README.md)."""
