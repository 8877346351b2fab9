"""Tasks: datasets generated here, shipped in packages, or read from standard files."""
