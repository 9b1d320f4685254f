"""Graph passes, one per module. `infra.run_pass` runs each with provenance, lint and dumps."""
