"""Example host apps; each folder is self-contained and has its own tests."""
