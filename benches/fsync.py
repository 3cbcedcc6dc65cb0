#!/usr/bin/env python3
"""What one decision-log commit costs the disk under DIR: CPU and wall time of a
1,270-byte append (a 20-field decrypt entry) followed by fdatasync, into a growing
file (as the log writes today) and into a file written ahead with zeros (no size or
extent metadata to sync), interleaved, RUNS runs of N commits each.

    benches/fsync.py [DIR] [RUNS] [N]      # defaults: /var/tmp 3 3000

CPU is this process's user+system time per commit (kernel work done elsewhere, such
as I/O completion, is not counted); wall is the time per commit.
"""
import os
import sys
import tempfile
import time

directory = sys.argv[1] if len(sys.argv) > 1 else "/var/tmp"
runs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
count = int(sys.argv[3]) if len(sys.argv) > 3 else 3000
line = b"x" * 1269 + b"\n"


def commits(written_ahead):
    with tempfile.NamedTemporaryFile(dir=directory) as file:
        fd = file.fileno()
        if written_ahead:
            os.write(fd, b"\0" * (count * len(line) + 4096))
            os.fsync(fd)
            os.lseek(fd, 0, os.SEEK_SET)
        before, started = os.times(), time.monotonic()
        for _ in range(count):
            os.write(fd, line)
            os.fdatasync(fd)
        after, ended = os.times(), time.monotonic()
    cpu = (after.user - before.user) + (after.system - before.system)
    return cpu / count * 1e6, (ended - started) / count * 1e6


for run in range(1, runs + 1):
    for written_ahead in (False, True):
        cpu, wall = commits(written_ahead)
        kind = "written ahead" if written_ahead else "growing     "
        print(f"run {run}: {kind}  cpu {cpu:6.0f} us per commit  wall {wall:6.0f} us")
