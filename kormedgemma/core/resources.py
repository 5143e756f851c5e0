"""What a notebook costs: peak GPU memory, peak RAM, bytes written.

A week-long run is planned from these figures (will 5.01 fit the card, will 2.02 fit the RAM, how
much disk do the stages need), so the runner records them for every notebook it executes:

- from outside, a sampler thread walks the kernel's whole process tree (the kernel, datatrove
  workers, compile workers, a server a notebook starts) for its summed resident memory, the bytes
  each process wrote, and — where NVML is present — the GPU memory each process holds (the CUDA
  context and the allocator's reserve included, as `nvidia-smi` shows it). Resident memory is
  split as the kernel counts it: anonymous (what the processes allocated: it must fit in RAM)
  and file-backed (pages of files they read through a memory map, e.g. a safetensors checkpoint
  being loaded: page cache the kernel can drop under pressure). At the tree's peak the sampler
  also keeps which processes held it, so a figure that is too high says where to look;
- from inside, a cell appended to the executed copy reads the kernel's own allocator peaks
  (allocated vs reserved), which only that process knows. Code that resets the peak counters to
  measure one part (a training stage) goes through `reset_peak_gpu_memory`, which keeps the
  process's earlier peaks for this report.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

GB = 1e9
_high_water = {"allocated": 0, "reserved": 0}


def reset_peak_gpu_memory(device: Any = None) -> None:
    """`torch.cuda.reset_peak_memory_stats`, keeping the peaks so far for `kernel_peaks`."""
    import torch

    _high_water["allocated"] = max(_high_water["allocated"], torch.cuda.max_memory_allocated(device))
    _high_water["reserved"] = max(_high_water["reserved"], torch.cuda.max_memory_reserved(device))
    torch.cuda.reset_peak_memory_stats(device)


def kernel_peaks() -> dict[str, Any]:
    """This process's peak RSS and, if it used CUDA, its allocator's peak allocated/reserved bytes."""
    peaks: dict[str, Any] = {"kernel_peak_rss_gb": round(_peak_rss() / GB, 2)}
    if _cells.cells:
        peaks["cells"] = list(_cells.cells)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        peaks["peak_gpu_allocated_gb"] = round(max(_high_water["allocated"], torch.cuda.max_memory_allocated()) / GB, 2)
        peaks["peak_gpu_reserved_gb"] = round(max(_high_water["reserved"], torch.cuda.max_memory_reserved()) / GB, 2)
    return peaks


def _peak_rss() -> int:
    """This process's own high-water mark (VmHWM, and what it was before `track_cells` reset it for
    each cell); ru_maxrss would carry the parent's across fork."""
    peak = status_bytes().get("VmHWM")
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return max(peak, _cells.folded)


def status_bytes(pid: int | str = "self") -> dict[str, int]:
    """A process's memory fields from /proc/<pid>/status (VmHWM, RssAnon, RssFile, RssShmem, ...) in
    bytes, read once; empty where /proc does not say (not Linux, or the process is gone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text(encoding="ascii", errors="replace").splitlines()
    except OSError:
        return {}
    return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in lines
            if line.startswith(("Vm", "Rss")) and line.rstrip().endswith("kB")}


class _CellPeaks:
    """Inside a notebook's kernel: each cell's own peak RSS, so a notebook whose figure is too high
    says which cell to look at, and how much of it was allocated (anonymous: must fit in RAM)
    rather than pages of files read through a memory map (page cache the kernel drops under
    pressure).

    Before each cell the kernel's high-water mark is folded into `folded` and reset (writing 5 to
    /proc/self/clear_refs), so VmHWM after the cell is that cell's exact peak; a 0.2 s sampler
    thread adds the largest anonymous, file-backed and shared-memory RSS seen during the cell (the
    a5000 rehearsal's 3.06 kernel held ~9 GB that was neither anonymous nor file-backed)."""

    def __init__(self) -> None:
        self.cells: list[dict[str, Any]] = []
        self.folded = 0
        self.exact = True
        self._current: Optional[dict[str, Any]] = None
        self._lock = threading.Lock()

    def start(self, interval: float = 0.2) -> None:
        from IPython import get_ipython

        shell = get_ipython()
        if shell is None:
            raise RuntimeError("track_cells() runs inside a notebook kernel (IPython), not a plain interpreter")
        shell.events.register("pre_run_cell", self._before)
        shell.events.register("post_run_cell", self._after)
        threading.Thread(target=self._sample_loop, args=(interval,), daemon=True, name="kormedgemma-cells").start()

    def _before(self, info: Any) -> None:
        self.folded = max(self.folded, status_bytes().get("VmHWM", 0))
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:  # not Linux, or not allowed: each cell's figure is then the peak so far
            self.exact = False
        with self._lock:
            self._current = {"source": _headline(getattr(info, "raw_cell", "") or ""), "started": time.time(),
                             "anon": 0, "file": 0, "shmem": 0}
        self._sample()

    def _after(self, result: Any) -> None:
        self._sample()
        peak = status_bytes().get("VmHWM", 0)
        self.folded = max(self.folded, peak)
        with self._lock:
            current, self._current = self._current, None
        if current is None:
            return
        self.cells.append({"cell": len(self.cells) + 1, "source": current["source"],
                           "seconds": round(time.time() - current["started"], 1),
                           "peak_rss_gb": round(peak / GB, 2), "peak_anon_gb": round(current["anon"] / GB, 2),
                           "peak_file_gb": round(current["file"] / GB, 2),
                           "peak_shmem_gb": round(current["shmem"] / GB, 2), "exact": self.exact,
                           "largest_mappings": largest_mappings()})

    def _sample(self) -> None:
        status = status_bytes()
        with self._lock:
            if self._current is not None:
                for kind, field in (("anon", "RssAnon"), ("file", "RssFile"), ("shmem", "RssShmem")):
                    self._current[kind] = max(self._current[kind], status.get(field, 0))

    def _sample_loop(self, interval: float) -> None:
        while True:
            time.sleep(interval)
            self._sample()


_cells = _CellPeaks()


def largest_mappings(count: int = 4, smaps: str = "/proc/self/smaps") -> list[dict[str, Any]]:
    """What this process's resident memory is, by mapping (a file, `[heap]`, a device, shared
    memory), the largest first: names what a peak is made of when the totals cannot."""
    sizes: dict[str, int] = {}
    name = "?"
    try:
        with open(smaps, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                head = line.split(None, 1)[0]
                if head == "Rss:":
                    sizes[name] = sizes.get(name, 0) + int(line.split()[1]) * 1024
                elif not head.endswith(":"):  # a mapping's header line: address perms offset dev inode [path]
                    parts = line.split(None, 5)
                    name = parts[5].strip() if len(parts) > 5 else "[anonymous]"
    except OSError:
        return []
    return [{"mapping": key[:120], "rss_gb": round(size / GB, 2)}
            for key, size in sorted(sizes.items(), key=lambda item: -item[1])[:count] if size >= 0.05 * GB]


def track_cells() -> None:
    """Record each following cell's peak memory for `kernel_peaks` (the runner's first cell calls it)."""
    _cells.start()


def _headline(source: str) -> str:
    """The line that says what a cell does: its first that is not a comment or an import."""
    lines = [line.strip() for line in source.splitlines() if line.strip()]
    doing = [line for line in lines if not line.startswith(("#", "from ", "import "))]
    return ((doing or lines or [""])[0])[:100]


def write_kernel_peaks(path: str) -> None:
    Path(path).write_text(json.dumps(kernel_peaks()), encoding="utf-8")


def peaks_cell(path: Path) -> str:
    """Source of the cell the runner appends to a notebook's executed copy."""
    return ("# Appended by the runner: this kernel's peak memory, for the run's resource table.\n"
            f"from kormedgemma.core.resources import write_kernel_peaks\nwrite_kernel_peaks({str(path)!r})")


TRACK_CELL = ("# Added by the runner: each cell's peak memory, for the run's resource table.\n"
              "from kormedgemma.core.resources import track_cells\ntrack_cells()")


class _Gpu:
    """Per-process GPU memory through NVML (nvidia-ml-py), or nothing where it is absent."""

    def __init__(self) -> None:
        self.handles: list[Any] = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # noqa: BLE001 — no driver, no library: GPU figures are left out
            self.handles = []

    def used_by(self, pids: set[int]) -> Optional[int]:
        if not self.handles:
            return None
        total = 0
        for handle in self.handles:
            try:
                processes = self.nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            except Exception:  # noqa: BLE001
                return None
            total += sum(p.usedGpuMemory or 0 for p in processes if p.pid in pids)
        return total


class TreeSampler:
    """Samples the process tree under `parent` (its children, recursively) until stopped."""

    def __init__(self, parent: Optional[int] = None, interval: float = 0.5) -> None:
        self.parent = parent or os.getpid()
        self.interval = interval
        self.peak_rss = 0
        self.peak_anon = 0
        self.at_peak: list[dict[str, Any]] = []  # the processes holding the tree's peak RSS
        self.peak_gpu: Optional[int] = None
        self.written: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="kormedgemma-resources")
        self._gpu: Optional[_Gpu] = None

    def __enter__(self) -> "TreeSampler":
        self._gpu = _Gpu()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        import psutil

        try:
            children = psutil.Process(self.parent).children(recursive=True)
        except psutil.Error:
            return
        rss, anon, holders = 0, 0, []
        for child in children:
            try:
                resident = child.memory_info().rss
                self.written[child.pid] = max(self.written.get(child.pid, 0), child.io_counters().write_bytes)
            except (psutil.Error, AttributeError):  # gone, or no io counters on this platform
                continue
            own = status_bytes(child.pid).get("RssAnon")
            rss += resident
            anon += own if own is not None else resident
            holders.append((resident, own, child))
        if rss > self.peak_rss:
            self.at_peak = [{"pid": c.pid, "name": _name(c), "rss_gb": round(r / GB, 2),
                             "anon_gb": None if a is None else round(a / GB, 2)}
                            for r, a, c in sorted(holders, key=lambda h: -h[0])[:6] if r >= 0.05 * GB]
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_anon = max(self.peak_anon, anon)
        used = self._gpu.used_by({c.pid for c in children}) if self._gpu else None
        if used is not None:
            self.peak_gpu = max(self.peak_gpu or 0, used)

    def figures(self) -> dict[str, Any]:
        out: dict[str, Any] = {"peak_rss_gb": round(self.peak_rss / GB, 2),
                               "peak_anon_rss_gb": round(self.peak_anon / GB, 2),
                               "written_gb": round(sum(self.written.values()) / GB, 3)}
        if self.at_peak:
            out["processes_at_peak"] = self.at_peak
        if self.peak_gpu is not None:
            out["peak_gpu_process_gb"] = round(self.peak_gpu / GB, 2)
        return out


def _name(process: Any) -> str:
    """A short label: the executable and what it runs (`python -m ipykernel_launcher`, a compile worker)."""
    try:
        command = process.cmdline()
    except Exception:  # noqa: BLE001 — gone or not ours to read
        return "?"
    return " ".join(Path(command[0]).name if i == 0 else part for i, part in enumerate(command[:4]))[:120] if command else "?"


def tree_bytes(root: Path) -> int:
    """Bytes of the files under `root` (0 if it does not exist); links are not followed."""
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                continue
    return total
