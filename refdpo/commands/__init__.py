"""One module per `refdpo` verb, each with its own config dataclass: train, evaluate, score (and its resumable
job, score_job), check, generate, judge, analyze, sweep. The demo and `tiny` live in refdpo/testbed."""
