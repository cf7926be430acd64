"""The metadata store: the filesystem's metadata in arena pages, always current.

Every inode, directory entry, symlink target, xattr and file page map lives in pages of
the ``guestfs`` pool (preserved from birth, so a kexec hands them over without a copy),
changed in place under an undo journal so that a SIGKILL at any instant leaves a state
the next mount recovers by itself. The modules, one format each (docs/handover-abi.md,
"guestfs-v2"):

- `page`: the header every metadata page starts with, and its checksum;
- `journal`: transactions: the undo journal, allocation and free records, recovery;
- `radix`: a radix table of u64 values (the inode table's and each file's page map);
- `btree`: a B+tree of u64 keys to short values (directories, the orphan list);
- `blob`: a byte string in a chain of pages (xattrs, long symlink targets);
- `records`: the inode record and the inode table;
- `superblock`: the superblock page;
- `store`: `MetaStore`, what the filesystem core calls.
"""
