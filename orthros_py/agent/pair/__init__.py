"""Service protection run by the agents: the active host's replicator, the standby's generation
store and watcher, the witness's vote, and the guard rules (timings, leases, epochs) that keep
two hosts from ever serving one service at once."""
