"""Command-line tools packaged with megatron-r1 (`megatron-r1 convert`, `megatron-r1 plan`); the scripts in
the repository's tools/ directory are thin shims over these, so both work from any directory once installed."""
