"""The Gunicorn side of the kit: sizing, the worker class, lifecycle hooks, crash forensics."""
