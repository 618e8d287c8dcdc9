"""What runs in the master: the server hooks, the roster of ids, sizing, metrics, the run
directory."""
