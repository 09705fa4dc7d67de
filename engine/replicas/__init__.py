"""The Engine's interface with the jobs run on Ray Serve replicas (Ray is imported only here)."""
