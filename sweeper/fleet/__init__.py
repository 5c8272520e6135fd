"""Many workers on one study: `--jobs`, heartbeats, lost trials, reap, signals."""
