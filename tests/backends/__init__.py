"""Backend conformance suite: every KeyBackend, through the interface only."""
