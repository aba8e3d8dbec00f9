"""Everything that runs on Ray: the search driver, trials, the float baseline, and
the compression engine (pure torch, usable without Ray or the service)."""
