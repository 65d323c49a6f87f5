"""The packaged YAML configs (tiny, base, demo, DeepSpeed JSON): read with `hiervl.config.packaged_config`."""
