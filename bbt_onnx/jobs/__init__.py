"""One module per command's job: inputs checked, the work done, a result handed back. The CLI only parses flags
and prints; Python callers run the same jobs."""
