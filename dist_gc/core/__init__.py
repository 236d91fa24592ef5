"""Pure GC math, configuration and parameter selection (imports only torch)."""
