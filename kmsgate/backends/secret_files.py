"""Files that hold a secret (the softkms root key, a PKCS#11 PIN): read only if no one but
their owner can reach them."""

from __future__ import annotations

import os
import stat

ROOT_UID = 0


def exposure(st: os.stat_result) -> str | None:
    """What is wrong with a secret file's mode, or None. A file may be readable and writable
    by its owner only; or, owned by root, also readable by its group: a Kubernetes Secret
    volume with `fsGroup` makes its files 0440 root:<fsGroup>, and the gateway reads them
    through that group (the rule PostgreSQL applies to its server key)."""
    others = stat.S_IRWXO | (stat.S_IWGRP | stat.S_IXGRP if st.st_uid == ROOT_UID else stat.S_IRWXG)
    if st.st_mode & others:
        if st.st_uid == ROOT_UID:
            return "must not be accessible by others, nor writable by its group"
        return "must not be accessible by group or others"
    return None
