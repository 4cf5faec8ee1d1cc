"""Usage reporting: every prompt and generated token, spooled durably and streamed to attribution."""
