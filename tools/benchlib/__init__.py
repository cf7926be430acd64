"""The guestfs benchmark harness behind ``tools/bench`` (issue 5).

One module per job: `profiles` (sizes), `systems` (the filesystems compared and how to
mount and clean them up), `fio` and `metadata` (the data-path and metadata workloads),
`datapath` (running them), `trees`, `baseline` and `kexec` (blackout against the
copy-to-disk baseline), `targets` (the issue's targets), `report` and `plots` (outputs),
`cli` (the command). Run as ``python -m benchlib`` with ``tools/`` on ``sys.path``.
"""
