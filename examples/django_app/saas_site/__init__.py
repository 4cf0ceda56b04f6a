"""The example Django project: settings, URLs, the Billing and one gated view."""
