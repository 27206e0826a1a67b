"""Command-line tools: data preparation, converters, pseudo-labelling, visualisation, benchmarks."""
