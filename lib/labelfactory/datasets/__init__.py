"""Public CT data sets in the layouts the benchmarks and the bundled samples use."""
