"""Weights in 2 MiB pages for decoding (Linux transparent huge pages).

Why: a decode step reads every weight once (paper §3.3: the recurrent mode's cost is the weights, not the
state), so its speed is the speed of streaming the weights from DRAM. With 4 KiB pages, 517 MB of float32
weights span 126K pages, far more than the TLB holds: the stream takes a page walk every 4 KiB. In 2 MiB pages
it takes one every 2 MiB, and reads faster (docs/engine.md).

How: Linux backs an anonymous mapping with huge pages when asked (madvise MADV_HUGEPAGE) if
/sys/kernel/mm/transparent_hugepage/enabled is "always" or "madvise" (most distributions). torch allocates a
parameter wherever malloc puts it, 4 KiB pages in "madvise" mode, so `use_huge_pages` copies the parameters
into one 2 MiB-aligned mapping advised before its first touch, and points each parameter's `.data` at its
slice. Values, dtypes, shapes, tied parameters and `requires_grad` are unchanged; the old memory is freed.

It is applied from outside the model (as compile or precision are): the `mambakit generate` and `mambakit serve`
commands call it once per model (unless --no-huge-pages); MAMBAKIT_HUGE_PAGES=0 turns it off. Where the kernel
has no transparent huge pages, or on another OS, it does nothing and says so once in the log. The parameters'
storage then lives in a mapping the tensors hold: it cannot be resized (FSDP resizes storages; do this for
inference only).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import sys
import weakref

import torch

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20  # 2 MiB: x86-64 and arm64 (4 KiB base pages) transparent huge page size
MADV_HUGEPAGE = 14
MIN_BYTES = 8 << 20  # below this the TLB covers the weights well enough; not worth a copy
ALIGN = 64  # each parameter starts on a cache line

_done: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()
_said: set[str] = set()


def _say_once(msg: str, level=logging.INFO) -> None:
    if msg not in _said:
        _said.add(msg)
        log.log(level, msg)


def supported() -> tuple[bool, str]:
    """(True, "") if this process can get transparent huge pages by madvise, else (False, why)."""
    if os.environ.get("MAMBAKIT_HUGE_PAGES", "1") == "0":
        return False, "MAMBAKIT_HUGE_PAGES=0"
    if not sys.platform.startswith("linux"):
        return False, f"not Linux ({sys.platform})"
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read()
    except OSError:
        return False, "no /sys/kernel/mm/transparent_hugepage (kernel without transparent huge pages)"
    if "[never]" in mode:
        return False, "transparent huge pages are off ([never] in /sys/kernel/mm/transparent_hugepage/enabled)"
    return True, ""


def _madvise_huge(address: int, length: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), MADV_HUGEPAGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"madvise(MADV_HUGEPAGE): {os.strerror(err)}")


def _key(params: list[torch.nn.Parameter]) -> tuple:
    return tuple((id(p), p.data_ptr()) for p in params)


def huge_page_arena(nbytes: int) -> torch.Tensor:
    """A uint8 tensor of nbytes on a 2 MiB boundary, in a private anonymous mapping advised MADV_HUGEPAGE
    before any page of it is touched. The tensor keeps the mapping alive."""
    span = -(-nbytes // HUGE_PAGE) * HUGE_PAGE  # whole huge pages
    # one huge page more than the span, so that a 2 MiB-aligned span fits wherever the mapping starts
    m = mmap.mmap(-1, span + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = torch.frombuffer(m, dtype=torch.uint8)  # holds a reference to m
    offset = -whole.data_ptr() % HUGE_PAGE
    _madvise_huge(whole.data_ptr() + offset, span)  # inside the mapping: offset + span <= len(m)
    return whole[offset : offset + nbytes]


def use_huge_pages(model: torch.nn.Module) -> int:
    """Moves the model's CPU parameters into 2 MiB pages (see the module docstring). Returns the bytes moved
    (0 if unsupported, too small, or already done for these parameters). Call it outside autograd (it
    reassigns `.data`); the `mambakit generate` and `serve` commands call it for you."""
    params = list(model.parameters())  # unique Parameters: tied weights appear once
    if model in _done and _done[model] == _key(params):
        return 0
    ok, why = supported()
    if not ok:
        _say_once(f"huge pages: not used ({why})")
        return 0
    movable = [p for p in params if p.device.type == "cpu" and p.is_contiguous() and not p.is_sparse
               and p.untyped_storage().nbytes() == p.numel() * p.element_size()]  # own storage, no views
    total = sum(-(-p.numel() * p.element_size() // ALIGN) * ALIGN for p in movable)
    if total < MIN_BYTES:
        _done[model] = _key(params)
        return 0
    try:
        with torch.inference_mode(False):
            arena = huge_page_arena(total)
    except OSError as e:
        _say_once(f"huge pages: not used ({e})", logging.WARNING)
        return 0
    offset = 0
    # not inference tensors even when called under inference_mode: the model may be trained afterwards
    with torch.inference_mode(False), torch.no_grad():
        for p in movable:
            n = p.numel() * p.element_size()
            slot = arena[offset : offset + n].view(p.dtype).view(p.shape)  # (p.shape) in the arena
            slot.copy_(p.data)
            p.data = slot
            offset += -(-n // ALIGN) * ALIGN
    _done[model] = _key(params)
    _say_once(f"huge pages: {total / 2**20:.0f} MiB of weights moved into 2 MiB pages")
    return total


def huge_page_bytes(t: torch.Tensor) -> int:
    """Bytes of the mapping that holds t which the kernel backs with huge pages (AnonHugePages in
    /proc/self/smaps), for tests and benchmarks; 0 where that cannot be read."""
    address = t.data_ptr()
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split()[0]
                if "-" in head and not head.endswith(":"):
                    lo, hi = (int(v, 16) for v in head.split("-"))
                    inside = lo <= address < hi
                elif inside and head == "AnonHugePages:":
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
