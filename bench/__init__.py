"""spoold benchmarks: each module's `main()` prints its figures next to a reference tool measured in the same run."""
