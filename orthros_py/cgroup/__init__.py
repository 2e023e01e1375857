"""A process tree's cgroups: the migration file (model) and the live filesystem (fs)."""
