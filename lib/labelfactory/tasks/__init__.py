"""MONAI Label adapters (infers, trainers, strategies, scoring) over the library: thin, one module per model family."""
