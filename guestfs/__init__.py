"""guestfs: a persistent in-memory filesystem whose pages live in the emulated machine's
arena and survive a simulated kexec through KHO."""

__version__ = "0.4.0.dev0"
