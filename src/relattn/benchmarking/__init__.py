"""The measurements behind ``relattn bench`` (:mod:`relattn.cli.bench`) and the scripts in
benchmarks/: contenders timed side by side in one process (docs/design.md, Benchmark protocol).

``common`` holds the device-independent pieces (machine description, interleaved timing, peak
memory, Markdown); ``cpu`` the CPU comparison, ``gpu`` the GPU comparison and ``decode`` the
decoding one.
"""
