"""Mirror a registry on an object store into a local directory registry.

Worker and API never read the object store on their hot path: they read a local
directory registry (``registry_path``), which :class:`RegistryMirror` keeps in step
with the remote one (``registry_url``). A sync, for every model the remote serves:

* downloads its CURRENT version (and the versions of its alignment chain) unless the
  cache has it already: into a staging directory, every file's sha256 checked
  against the manifest while it streams, then the same checks as a reader
  (:func:`models.registry.load_artifact`), then renamed into place;
* points the local CURRENT at it (write-then-rename), which the worker and the API
  follow as they follow any directory registry.

A remote version that fails its checks is refused with one log line
(``event=registry_mirror_refused``) and the local CURRENT keeps serving the old one;
it is tried again only once its objects change. A model without a remote CURRENT is
retired locally (unless the remote serves no model at all: an empty or wrong prefix
retires nothing). Processes sharing one cache take turns (a file lock).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

import msgspec

from models.registry import (
    MANIFEST_FILE,
    Manifest,
    RegistryError,
    _fsync_dir,
    _write_synced,
    check_version_name,
    current_version,
    load_artifact,
    load_manifest,
    model_root,
    retire_model,
    served_models,
    set_current,
)
from models.registry_remote import DownloadAborted, ObjectRegistry, artifact_files
from service.core.clock import sleep_unless_stopped

if TYPE_CHECKING:
    from service.settings import Settings

log = logging.getLogger(__name__)

LOCK_FILE: Final = ".mirror.lock"
STAGING_PREFIX: Final = ".mirror-"


@dataclass
class SyncReport:
    """What one sync did."""

    current: dict[str, str] = field(default_factory=dict)  # model -> local CURRENT after it
    installed: list[str] = field(default_factory=list)  # "model/version" downloaded
    refused: dict[str, str] = field(default_factory=dict)  # model -> why its CURRENT was not
    retired: list[str] = field(default_factory=list)
    downloaded_bytes: int = 0
    error: str | None = None  # the remote could not be listed: nothing changed
    skipped: bool = False  # another process holds the cache's lock


@contextlib.contextmanager
def _cache_lock(cache: Path, *, wait: bool = False) -> Iterator[bool]:
    """Whether this process got the cache's lock (at once unless ``wait``); held inside."""
    with (cache / LOCK_FILE).open("a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class RegistryMirror:
    """Keeps the directory registry ``cache`` in step with ``remote``."""

    def __init__(self, remote: ObjectRegistry, cache: Path) -> None:
        self.remote = remote
        self.cache = cache
        self._abort = threading.Event()
        self._refused: dict[tuple[str, str], tuple[object, str]] = {}  # -> (fingerprint, why)
        self._last_error: str | None = None

    def sync(self, *, wait: bool = False) -> SyncReport:
        """One pass (blocking: run it off the event loop); skipped while another process
        syncs the same cache, unless ``wait``."""
        self.cache.mkdir(parents=True, exist_ok=True)
        with _cache_lock(self.cache, wait=wait) as held:
            if not held:
                return SyncReport(skipped=True)
            report = SyncReport()
            try:
                self._sync(report)
            except DownloadAborted:
                log.info("event=registry_mirror_aborted url=%s", self.remote.url)
            return report

    def fetch(self, model: str, version: str, *, make_current: bool = True) -> SyncReport:
        """Mirror one remote version (and its alignment chain), as the local CURRENT too
        by default; a version that fails its checks is in the report's ``refused``."""
        self.cache.mkdir(parents=True, exist_ok=True)
        report = SyncReport()
        with _cache_lock(self.cache, wait=True):
            try:
                self._install_chain(model, check_version_name(version), report)
                if make_current:
                    set_current(model_root(self.cache, model), version)
                    report.current[model] = version
            except RegistryError as exc:
                report.refused[model] = str(exc)
        return report

    def _sync(self, report: SyncReport) -> None:
        try:
            remote = self.remote.served()
        except Exception as exc:  # unreachable, denied: keep serving the cache as it is
            report.error = f"{type(exc).__name__}: {exc}"
            if report.error != self._last_error:
                log.warning(
                    "event=registry_unreachable url=%s reason=%r", self.remote.url, report.error
                )
            self._last_error = report.error
            return
        self._last_error = None
        for model, version in remote.items():
            try:
                self._follow(model, version, report)
            except DownloadAborted:
                raise
            except Exception as exc:  # a network error mid-download: tried again next time
                log.warning(
                    "event=registry_mirror_failed model=%s version=%s reason=%r",
                    model,
                    version,
                    f"{type(exc).__name__}: {exc}",
                )
        self._retire_gone(remote, report)

    def _follow(self, model: str, version: str, report: SyncReport) -> None:
        local = model_root(self.cache, model)
        serving = current_version(local)
        if serving == version and (local / version).is_dir():
            report.current[model] = version
            return
        try:
            mark = self.remote.fingerprint(model, check_version_name(version))
        except RegistryError as exc:
            self._refuse(model, version, serving, (), str(exc), report)
            return
        refused = self._refused.get((model, version))
        if refused is not None and refused[0] == mark:
            report.refused[model] = refused[1]  # unchanged since: not downloaded again
            return
        try:
            self._install_chain(model, version, report)
            set_current(local, version)
        except RegistryError as exc:
            self._refuse(model, version, serving, mark, str(exc), report)
            return
        self._refused.pop((model, version), None)
        report.current[model] = version
        log.info(
            "event=registry_mirror_current model=%s version=%s previous=%s", model, version, serving
        )

    def _refuse(
        self,
        model: str,
        version: str,
        serving: str | None,
        mark: object,
        reason: str,
        report: SyncReport,
    ) -> None:
        """Remember the refusal (until the version's objects change) and say it once."""
        report.refused[model] = reason
        if self._refused.get((model, version)) == (mark, reason):
            return
        self._refused[(model, version)] = (mark, reason)
        log.error(
            "event=registry_mirror_refused model=%s version=%s url=%s serving=%s reason=%r",
            model,
            version,
            self.remote.location(model),
            serving,
            reason,
        )

    def _install_chain(self, model: str, version: str, report: SyncReport) -> None:
        """``version``, then the parents its alignment maps onto (so that the served space
        is the one a directory registry gives); a parent that fails ends the chain."""
        seen: set[str] = set()
        next_version: str | None = version
        while next_version is not None and next_version not in seen:
            seen.add(next_version)
            try:
                manifest = self._install(model, check_version_name(next_version), report)
            except RegistryError as exc:
                if next_version == version:
                    raise
                log.warning(
                    "event=registry_mirror_parent_unusable model=%s version=%s reason=%r",
                    model,
                    next_version,
                    str(exc),
                )
                return
            alignment = manifest.alignment
            next_version = None if alignment is None else alignment.parent_version

    def _install(self, model: str, version: str, report: SyncReport) -> Manifest:
        """The version in the cache: reused when there, else downloaded, checked, renamed in."""
        local = model_root(self.cache, model)
        target = local / version
        if target.is_dir():
            return load_manifest(local, version)
        where = self.remote.location(model, version)
        raw = self.remote.read_file(model, version, MANIFEST_FILE)
        if raw is None:
            raise RegistryError(f"model {version}: {where}/{MANIFEST_FILE} is missing")
        try:
            manifest = msgspec.json.decode(raw, type=Manifest)
        except msgspec.DecodeError as exc:
            raise RegistryError(f"model {version}: manifest.json is malformed: {exc}") from None
        if manifest.version != version:
            raise RegistryError(f"model {version}: manifest names version {manifest.version!r}")
        local.mkdir(parents=True, exist_ok=True)
        for stale in local.glob(f"{STAGING_PREFIX}*"):  # left by a crash: the lock is ours
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=local))
        try:
            stage = staging / version
            stage.mkdir()
            for name, expected in artifact_files(manifest).items():
                actual, size = self.remote.download(model, version, name, stage / name, self._abort)
                if actual != expected:
                    raise RegistryError(
                        f"model {version}: sha256 of {name} at {where} is {actual[:12]}..., "
                        f"manifest says {expected[:12]}...: refusing a corrupted artifact"
                    )
                report.downloaded_bytes += size
            _write_synced(stage / MANIFEST_FILE, raw)
            _fsync_dir(stage)
            load_artifact(staging, version)  # schema hash, graph inputs: as a reader will
            try:
                stage.rename(target)
            except OSError:
                if not target.is_dir():  # else another process installed it meanwhile
                    raise
            _fsync_dir(local)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        report.installed.append(f"{model}/{version}")
        log.info(
            "event=registry_mirror_installed model=%s version=%s url=%s", model, version, where
        )
        return manifest

    def _retire_gone(self, remote: dict[str, str], report: SyncReport) -> None:
        if not remote:
            if served_models(self.cache):
                log.warning(
                    "event=registry_mirror_empty url=%s reason='the remote registry serves no "
                    "model: retiring nothing'",
                    self.remote.url,
                )
            return
        for name in served_models(self.cache):
            if name not in remote:
                retire_model(self.cache, name)
                report.retired.append(name)
                log.info("event=registry_mirror_retired model=%s", name)

    async def follow(self, stop: asyncio.Event, every_s: float) -> None:
        """Sync now and every ``every_s`` seconds until ``stop``; a download in flight is
        abandoned when ``stop`` is set (or the task cancelled)."""
        self._abort.clear()

        async def abort_on_stop() -> None:
            await stop.wait()
            self._abort.set()

        aborter = asyncio.create_task(abort_on_stop())
        try:
            while True:
                await asyncio.to_thread(self.sync)
                if await sleep_unless_stopped(stop, every_s):
                    return
        finally:
            self._abort.set()
            aborter.cancel()


def mirror_from_settings(settings: Settings) -> RegistryMirror | None:
    """The mirror of ``registry_url`` into ``registry_path``; None for a directory registry."""
    if settings.registry_url is None:
        return None
    remote = ObjectRegistry(settings.registry_url, settings.registry_storage_options)
    return RegistryMirror(remote, settings.registry_path)
