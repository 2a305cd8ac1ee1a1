"""The embedded demo library: a miniature Flan-T5 with twenty trained LoRAs and eight held-out tasks.

world.py defines the tasks, build.py (`python -m lorahub_cli.demo build`)
trains and writes registry/demo/, library.py reads and mirrors it at runtime.
"""
