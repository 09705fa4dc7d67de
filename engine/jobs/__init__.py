"""Running jobs: the device queue, one job's run, and what is kept of finished jobs."""
