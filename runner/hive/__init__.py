"""Finding and reading a Colmena-compatible hive."""
