"""Published measurements autopar's cost model is validated (not fitted) against, with the models
and configurations they were taken on. Benchmarks and tests read them; ``autopar`` never does."""
