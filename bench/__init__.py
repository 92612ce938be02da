"""Benchmarks: our Text2Video-Zero engine against its floor, plain SD and diffusers' pipeline.

``python -m bench.run --help`` times every mode side by side in one process;
``python -m bench.memory --help`` compares peak memory of short and long videos in
child processes. Results and the commands that made them are in BENCHMARKS.md.
"""
