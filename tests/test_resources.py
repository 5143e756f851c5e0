"""Per-notebook resource figures: the sampler sees a child process's memory and writes."""
import subprocess
import sys

from kormedgemma.resources import TreeSampler, tree_bytes, kernel_peaks

CHILD = """
import os, sys, time
block = bytearray(300 * 10**6)          # 300 MB resident
for i in range(0, len(block), 4096):
    block[i] = 1
with open(sys.argv[1], "wb") as handle:  # 64 MB written
    handle.write(os.urandom(64 * 10**6))
    handle.flush(); os.fsync(handle.fileno())
time.sleep(1.5)
"""


def test_sampler_sees_a_child_processes_memory_and_bytes_written(tmp_path):
    with TreeSampler(interval=0.1) as sampler:
        subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "out.bin")], check=True)
    figures = sampler.figures()
    assert 0.30 <= figures["peak_rss_gb"] < 1.0
    assert 0.064 <= figures["written_gb"] < 0.2  # 64 MB
    assert tree_bytes(tmp_path) == 64 * 10**6
    assert tree_bytes(tmp_path / "absent") == 0


def test_kernel_peaks_report_this_process_without_touching_cuda():
    peaks = kernel_peaks()
    assert peaks["kernel_peak_rss_gb"] > 0.01
    assert "peak_gpu_allocated_gb" not in peaks  # no CUDA on this process
