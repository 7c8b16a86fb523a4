"""Benchmarks of the device/cloud loop: ``python -m cdcca_ros.bench NAME --out FILE.json``.

Each bench prints a table and writes a JSON record with a ``summary`` of named figures (ratios
measured within one run, because this machine is shared and noisy), the machine, the seed and
the arguments. ``python -m cdcca_ros.bench report`` runs them all and writes a report of the
figures against their targets. The registry is :data:`cdcca_ros.bench.common.BENCHES`.
"""
