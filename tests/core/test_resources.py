"""Per-notebook resource figures: the sampler sees a child process's memory and writes."""
import json
import subprocess
import sys
import time

from kormedgemma.core.resources import TreeSampler, kernel_peaks, tree_bytes

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


# Three cells in a real IPython shell: the second allocates 400 MB and frees it, the third maps a
# 200 MB file and reads every page (the mapping still open at the cell's end, where the cell's figures
# are always sampled). Each cell's figure must be its own, not the notebook's so far.
CELLS = """
import json, mmap, sys
from IPython.core.interactiveshell import InteractiveShell
shell = InteractiveShell.instance()
shell.run_cell("from kormedgemma.core.resources import track_cells\\ntrack_cells()")
shell.run_cell("x = 1")
shell.run_cell("block = bytearray(400 * 10**6)\\nfor i in range(0, len(block), 4096): block[i] = 1\\ndel block")
shell.run_cell("import mmap, sys\\nf = open(sys.argv[1], 'rb')\\nm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)\\n"
               "total = sum(m[i] for i in range(0, len(m), 4096))")  # still mapped when the cell ends
shell.run_cell("m.close(); f.close()")
# shared memory (what pinned or shared buffers show as): neither allocated nor file pages
shell.run_cell("shared = mmap.mmap(-1, 200 * 10**6)\\nfor i in range(0, len(shared), 4096): shared[i] = 1")
from kormedgemma.core.resources import kernel_peaks
print(json.dumps(kernel_peaks()))
"""


def test_each_cell_reports_its_own_peak_and_whether_it_was_allocated_or_file_pages(tmp_path):
    mapped = tmp_path / "weights.bin"
    mapped.write_bytes(b"\1" * (200 * 10**6))
    done = subprocess.run([sys.executable, "-c", CELLS, str(mapped)], capture_output=True, text=True, check=True)
    peaks = json.loads(done.stdout.strip().splitlines()[-1])
    cells = {cell["source"]: cell for cell in peaks["cells"]}
    small, allocating, mapping = cells["x = 1"], cells["block = bytearray(400 * 10**6)"], cells["f = open(sys.argv[1], 'rb')"]
    assert all(cell["exact"] for cell in peaks["cells"]), "clear_refs could not reset the high-water mark"
    assert allocating["peak_rss_gb"] - small["peak_rss_gb"] > 0.38  # its 400 MB, not folded into later cells
    assert mapping["peak_rss_gb"] - small["peak_rss_gb"] > 0.18
    assert mapping["peak_rss_gb"] < allocating["peak_rss_gb"] - 0.15  # the 400 MB cell's peak was reset
    assert mapping["peak_file_gb"] - small["peak_file_gb"] > 0.1  # seen as file pages, not allocations
    assert mapping["peak_anon_gb"] - small["peak_anon_gb"] < 0.05  # and none of it allocated
    assert mapping["largest_mappings"][0]["mapping"] == str(mapped) and mapping["largest_mappings"][0]["rss_gb"] >= 0.19
    sharing = cells["shared = mmap.mmap(-1, 200 * 10**6)"]
    assert sharing["peak_shmem_gb"] - small["peak_shmem_gb"] > 0.15 and sharing["peak_rss_gb"] - small["peak_rss_gb"] > 0.15
    assert peaks["kernel_peak_rss_gb"] >= allocating["peak_rss_gb"]  # the notebook's peak keeps the largest
