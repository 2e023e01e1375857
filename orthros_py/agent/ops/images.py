"""Image directories and their files: ``list_images``, ``remove_image``, ``recv_file``,
``recv_files``, ``send_file``, ``push_images``.

Interfaces and privileges: files below the images root only (created mode 0700, never through a
symlink; a file appears whole or not at all), and for ``push_images`` a TCP connection to another
agent, authenticated with the cluster key. Reading and writing the root needs what owns it (root
for the default /var/lib/orthros/images).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

from orthros_py.agent.protocol import file_digest, validate_name
from orthros_py.agent.state import Agent, valid_name
from orthros_py.agent.table import Call, Reply, bad_request, op
from orthros_py.errors import BadImageError


def _file_info(image: str, path: Path, sha256: bool) -> dict[str, Any]:
    st = path.stat(follow_symlinks=False)
    info: dict[str, Any] = {"image": image, "filename": path.name, "size": st.st_size}
    if sha256:
        with path.open("rb") as f:
            info["sha256"] = file_digest(f)[1]
    return info


def _image_files(path: Path) -> list[Path]:
    """The regular files of an image directory (no temporaries, no symlinks)."""
    return sorted(p for p in path.iterdir()
                  if valid_name(p.name) and not p.is_symlink() and p.is_file())


def _image_info(a: Agent, image: str, sha256: bool) -> dict[str, Any]:
    path = a.image_path(image, must_exist=True)
    files = [_file_info(image, p, sha256) for p in _image_files(path)]
    links = [{"name": p.name, "target": os.readlink(p)}
             for p in sorted(path.iterdir()) if valid_name(p.name) and p.is_symlink()]
    with a.mutex:
        server = a.page_servers.get(image)
    return {"name": image, "files": files, "links": links,
            "checkpoint": (path / "inventory.img").is_file(),
            "bytes": sum(f["size"] for f in files), "mtime": path.stat().st_mtime,
            "busy": a.busy_with(image),
            "page_server": server.to_dict() if server is not None else None}


@op("list_images")
def op_list_images(call: Call, image: str | None = None, sha256: bool = False) -> dict[str, Any]:
    """The image directories below the root (or just ``image``) and their files."""
    a = call.agent
    names = [validate_name(image)] if image is not None else a.image_names()
    return {"images_root": str(a.images_root),
            "images": [_image_info(a, n, sha256) for n in names]}


@op("remove_image")
def op_remove_image(call: Call, image: str, background: bool = False) -> dict[str, Any]:
    """Delete image ``image`` and its files (refused while it is in use); ``background``:
    answer once it is out of the way (renamed), the files deleted afterwards."""
    a = call.agent
    path = a.image_path(image)
    if not path.exists() and not path.is_symlink():
        return {"image": image, "removed": False}
    with a.mutex:
        server = a.page_servers.get(image)
    if server is not None and server.alive():
        raise BadImageError(f"a page server (pid {server.pid}) still writes into {image!r}",
                            hint="stop it with page_server_stop first")
    with a.busy(image, "removal"):
        a.remove_image_dir(path, later=background)
    return {"image": image, "removed": True, "background": background}


@op("recv_file", payload=True)
def op_recv_file(call: Call, image: str, filename: str,
                 overwrite: bool = False, scratch: bool = False) -> dict[str, Any]:
    """Store the payload as file ``filename`` of image ``image`` (created if missing), after
    checking its SHA-256; it appears whole or not at all."""
    assert call.payload is not None
    a = call.agent
    validate_name(filename, "file name")
    other = a.busy_with(image)
    if other is not None:
        raise BadImageError(f"image {image!r} is busy with a {other}")
    path = a.image_path(image, create=True, scratch=scratch)
    target = path / filename
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise BadImageError(f"image {image!r} already has a file {filename}",
                            hint="pass overwrite to replace it")
    # A leading dot makes an invalid name: a partial file is never listed, sent or restored.
    tmp = path / f".{filename}.{os.getpid()}.{threading.get_ident()}.part"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except OSError as err:
        raise BadImageError(f"cannot write {filename} into image {image!r} at {path}: "
                            f"{err.strerror}") from err
    try:
        with os.fdopen(fd, "wb") as f:
            size = call.payload.copy_to(f)
        if overwrite:
            os.replace(tmp, target)
        else:
            try:
                os.link(tmp, target)  # no replacement of a file that appeared meanwhile
            except FileExistsError as err:
                raise BadImageError(f"image {image!r} already has a file {filename}") from err
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return {"image": image, "filename": filename, "size": size,
            "sha256": call.payload.sha256}


@op("recv_files", payload=True)
def op_recv_files(call: Call, image: str, files: list[dict[str, Any]],
                  overwrite: bool = False, scratch: bool = False) -> dict[str, Any]:
    """Store the payload, the concatenation of several files, as the files ``files`` names
    (``filename``, ``size``, ``sha256`` each, in payload order) of image ``image``: one request
    for a whole checkpoint's small files. Every file and the whole payload are checked before
    any file appears; then they appear one by one, each whole."""
    assert call.payload is not None
    a = call.agent
    manifest: list[tuple[str, int, str]] = []
    for f in files:
        try:
            name = validate_name(f["filename"], "file name")
            size, digest = int(f["size"]), str(f["sha256"])
        except (KeyError, TypeError, ValueError) as err:
            raise bad_request(f"bad entry in files: {f!r}") from err
        if size < 0:
            raise bad_request(f"negative size for {name}")
        manifest.append((name, size, digest))
    if sum(m[1] for m in manifest) != call.payload.length:
        raise bad_request("the sizes in files do not add up to the payload's length")
    if len({m[0] for m in manifest}) != len(manifest):
        raise bad_request("a file is named twice in files")
    other = a.busy_with(image)
    if other is not None:
        raise BadImageError(f"image {image!r} is busy with a {other}")
    path = a.image_path(image, create=True, scratch=scratch)
    if not overwrite:
        present = [m[0] for m in manifest if (path / m[0]).exists() or (path / m[0]).is_symlink()]
        if present:
            raise BadImageError(f"image {image!r} already has a file {present[0]}",
                                hint="pass overwrite to replace it")
    tag = f"{os.getpid()}.{threading.get_ident()}"
    tmps = [path / f".{name}.{tag}.part" for name, _, _ in manifest]
    try:
        chunks = call.payload.chunks()
        chunk = memoryview(b"")
        at = 0  # how much of ``chunk`` is used (a view: slicing copies nothing)
        for (name, size, digest), tmp in zip(manifest, tmps, strict=True):
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o600)
            except OSError as err:
                raise BadImageError(f"cannot write {name} into image {image!r} at {path}: "
                                    f"{err.strerror}") from err
            h = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                left = size
                while left:
                    if at == len(chunk):
                        chunk, at = memoryview(next(chunks)), 0
                    piece = chunk[at:at + left]
                    out.write(piece)
                    h.update(piece)
                    at += len(piece)
                    left -= len(piece)
            if h.hexdigest() != digest:
                raise BadImageError(f"{name} arrived damaged (its SHA-256 does not match)")
        for _ in chunks:  # the end of the payload: checks its SHA-256 against the header
            pass
        for (name, _, _), tmp in zip(manifest, tmps, strict=True):
            if overwrite:
                os.replace(tmp, path / name)
            else:
                try:
                    os.link(tmp, path / name)
                except FileExistsError as err:
                    raise BadImageError(f"image {image!r} already has a file {name}") from err
    except OSError as err:
        raise BadImageError(f"cannot store files into image {image!r} at {path}: "
                            f"{err.strerror}") from err
    finally:
        for tmp in tmps:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    return {"image": image, "files": [{"image": image, "filename": n, "size": z, "sha256": d}
                                      for n, z, d in manifest]}


@op("send_file")
def op_send_file(call: Call, image: str, filename: str) -> Reply:
    """Stream file ``filename`` of image ``image`` back as the response's payload."""
    path = call.agent.image_path(image, must_exist=True) / validate_name(filename, "file name")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError as err:
        raise BadImageError(f"image {image!r} has no file {filename}") from err
    except OSError as err:
        raise BadImageError(f"cannot read {filename} of image {image!r}: "
                            f"{err.strerror}") from err
    f = os.fdopen(fd, "rb")
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BadImageError(f"{filename} of image {image!r} is not a regular file")
        size, digest = file_digest(f)
    except BaseException:
        f.close()
        raise
    return Reply({"image": image, "filename": filename, "size": size, "sha256": digest},
                 payload=f, payload_len=size, payload_sha256=digest)


@op("push_images")
def op_push_images(call: Call, image: str, host: str, port: int, dest_image: str | None = None,
                   dest_name: str | None = None, overwrite: bool = False,
                   timeout: float = 600.0, files: tuple[str, ...] | None = None,
                   prefixes: tuple[str, ...] | None = None,
                   scratch: bool = False) -> dict[str, Any]:
    """Send every file of image ``image`` (or those named in ``files``, or whose names start
    with one of ``prefixes``) straight to the agent at ``host``:``port`` (into ``dest_image``,
    by default the same name), so images never detour through the caller."""
    from orthros_py.agent.client import AgentClient

    a = call.agent
    path = a.image_path(image, must_exist=True)
    dest = validate_name(dest_image or image)
    other = a.busy_with(image)
    if other is not None:
        raise BadImageError(f"image {image!r} is busy with a {other}")
    chosen = _image_files(path)
    if files is not None:
        wanted = {validate_name(f, "file name") for f in files}
        missing = sorted(wanted - {p.name for p in chosen})
        if missing:
            raise BadImageError(f"image {image!r} has no file(s) {', '.join(missing)}")
        chosen = [p for p in chosen if p.name in wanted]
    if prefixes is not None:
        chosen = [p for p in chosen if p.name.startswith(tuple(prefixes))]
    client = AgentClient(host, port, a.key, name=dest_name, timeout=timeout)
    start = time.perf_counter()
    sent = [f.to_dict() for f in client.upload_files(dest, chosen, overwrite=overwrite,
                                                     scratch=scratch)]
    return {"image": image, "dest_image": dest, "dest": client.name, "files": sent,
            "bytes": sum(int(f["size"]) for f in sent),
            "elapsed_ms": round((time.perf_counter() - start) * 1000, 3)}
