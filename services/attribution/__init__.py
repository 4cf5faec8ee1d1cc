"""Attribution: the per-token usage ledger, provenance and rewards."""
