"""The model presets as YAML includes (hit, hcmi, hanet, flat)."""
