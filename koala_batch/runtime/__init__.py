"""Running a job: Ray session, signals, the graph, orchestration, the console."""
