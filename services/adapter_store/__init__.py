"""The adapter store: validated catalog of adapters on S3 or a local directory."""
