"""Per-notebook resource figures: the sampler sees a child process's memory and writes."""
import subprocess
import sys
import time

from kormedgemma.resources import TreeSampler, kernel_peaks, tree_bytes

# The child holds its memory and its written file until the test has seen both: no race between the
# sampler's interval and the child's lifetime, however busy the machine is.
CHILD = """
import os, sys
block = bytearray(300 * 10**6)          # 300 MB resident
for i in range(0, len(block), 4096):
    block[i] = 1
with open(sys.argv[1], "wb") as handle:  # 64 MB written
    handle.write(os.urandom(64 * 10**6))
    handle.flush(); os.fsync(handle.fileno())
print("ready", flush=True)
sys.stdin.read()                         # until the test closes our stdin
"""


def test_sampler_sees_a_child_processes_memory_and_bytes_written(tmp_path):
    with TreeSampler(interval=0.05) as sampler:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "out.bin")], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "ready"
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                seen = sampler.figures()
                if seen["peak_rss_gb"] >= 0.30 and seen["written_gb"] >= 0.064:
                    break
                time.sleep(0.05)
        finally:
            child.stdin.close()
            child.wait(timeout=60)
    assert child.returncode == 0
    figures = sampler.figures()
    assert 0.30 <= figures["peak_rss_gb"] < 1.0
    # the child's 300 MB are its own allocation (anonymous), and it is named among the processes at the peak
    assert 0.30 <= figures["peak_anon_rss_gb"] <= figures["peak_rss_gb"]
    holder = max(figures["processes_at_peak"], key=lambda p: p["rss_gb"])
    assert holder["pid"] == child.pid and holder["anon_gb"] >= 0.30 and "python" in holder["name"]
    assert 0.064 <= figures["written_gb"] < 0.2  # 64 MB
    assert tree_bytes(tmp_path) == 64 * 10**6
    assert tree_bytes(tmp_path / "absent") == 0


def test_kernel_peaks_report_this_process_without_touching_cuda():
    peaks = kernel_peaks()
    assert peaks["kernel_peak_rss_gb"] > 0.01
    assert "peak_gpu_allocated_gb" not in peaks  # no CUDA on this process
