"""The public front: authentication, tenants, adapter-affinity routing and retries."""
