"""Model cards (TOML), one per model picochat knows by name."""
