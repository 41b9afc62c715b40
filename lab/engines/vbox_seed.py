"""NoCloud seed images: the small ISO cloud-init reads on a node's first boot.

cloud-init finds the seed by its volume label `cidata` and reads the files by their
Joliet or Rock Ridge names; pycdlib writes both, so the host needs no ISO tool.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path

import pycdlib

SEED_LABEL = "cidata"


def write_seed_iso(path: Path, files: Mapping[str, str]) -> None:
    """Write `files` (name to text) as a NoCloud seed ISO at `path`, readable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=SEED_LABEL)
    for index, (name, text) in enumerate(sorted(files.items())):
        data = text.encode()
        # Plain ISO 9660 names are 8.3 upper case; cloud-init reads the long names.
        iso.add_fp(
            io.BytesIO(data), len(data), f"/SEED{index}.;1", rr_name=name, joliet_path=f"/{name}"
        )
    partial = path.with_suffix(".partial")
    # The seed carries the node's private host key.
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        iso.write_fp(out)
    iso.close()
    partial.replace(path)


def read_seed_iso(path: Path) -> tuple[str, dict[str, str]]:
    """The volume label and the files of a seed ISO, as cloud-init would see them."""
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    try:
        label = iso.pvd.volume_identifier.decode().strip()
        files = {}
        for child in iso.list_children(joliet_path="/"):
            if child.is_dot() or child.is_dotdot():
                continue
            name = child.file_identifier().decode("utf-16-be")
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, joliet_path=f"/{name}")
            files[name] = out.getvalue().decode()
        return label, files
    finally:
        iso.close()
