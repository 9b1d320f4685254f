"""What every layer above reads off an exported graph: linear sites, node-meta keys and
stage names, and custom-op arguments by name. Imports torch only."""
