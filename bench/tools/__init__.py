"""Developer tools: timing scripts, the Triton AOT compiler, GPU tuning, profiling and the
GPU check. Run as `python -m bench.tools.NAME`; none is imported by the library."""
