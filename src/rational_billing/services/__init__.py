"""Services: the use cases (tenants, customers, webhooks, ...). They talk to ports only."""
