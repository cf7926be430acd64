"""The emulated machine: arena ("RAM"), memblock and scratch, the buddy page allocator,
Kexec HandOver (KHO) and kexec. Knows nothing about filesystems."""

__version__ = "0.3.0"
