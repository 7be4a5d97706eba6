"""The benchmark harness: task streams and data files, reference models, the Lightning module, metrics, recipes,
the benchmark runner, the report and the command line."""
