"""The embedded runner: the same manifest, the same engine, on one machine and no cluster."""
