"""The artifact cache's build lock, with real processes: one builds a key, the others reuse it."""
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lumen.engine.errors import InvalidInputError
from lumen.export.cache import ArtifactCache, CacheLockTimeout, key_of

FIELDS = {"artifact": "test", "n": 1}
# A process that builds FIELDS' entry: build() appends its pid to builds.log (one line per
# build that ran), marks started, sleeps SLEEP seconds, then writes the artifact.
BUILDER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from lumen.export.cache import ArtifactCache
    root, sleep = Path(sys.argv[1]), float(sys.argv[2])
    def build(staging):
        with open(root.parent / "builds.log", "a") as log:
            log.write(f"{os.getpid()}\\n")
        (root.parent / "started").touch()
        (staging / "a.bin").write_bytes(b"half")
        time.sleep(sleep)
        (staging / "a.bin").write_bytes(b"whole artifact")
    entry, hit = ArtifactCache(root, lock_timeout_s=float(sys.argv[3])).get_or_build(
        {"artifact": "test", "n": 1}, build)
    print(hit, (entry / "a.bin").read_bytes().decode())
""")


def start_builder(tmp_path: Path, sleep: float, lock_timeout_s: float = 60.0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", BUILDER, str(tmp_path / "cache"), str(sleep),
                             str(lock_timeout_s)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout_s} s"
        time.sleep(0.05)


def builds(tmp_path: Path) -> list[str]:
    log = tmp_path / "builds.log"
    return log.read_text().split() if log.exists() else []


def test_two_processes_missing_one_key_build_it_once(tmp_path):
    procs = [start_builder(tmp_path, sleep=1.5) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert len(builds(tmp_path)) == 1  # the second waited on the lock, then found the entry
    results = sorted(out.split(maxsplit=1)[0] for out, _ in outputs)
    assert results == ["False", "True"]
    assert all(out.split(maxsplit=1)[1].strip() == "whole artifact" for out, _ in outputs)


def test_killed_lock_holder_does_not_block_the_next_builder(tmp_path):
    holder = start_builder(tmp_path, sleep=600)
    wait_for(tmp_path / "started")
    waiter = start_builder(tmp_path, sleep=0)  # blocks on the holder's lock
    time.sleep(0.5)
    assert waiter.poll() is None and len(builds(tmp_path)) == 1
    holder.send_signal(signal.SIGKILL)
    holder.wait(30)
    out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 0, err
    assert out.split() == ["False", "whole", "artifact"]  # it built: the killed one left nothing
    assert len(builds(tmp_path)) == 2
    root = tmp_path / "cache"
    assert not list(root.glob(".tmp-*"))  # the killed build's staging dir was swept
    entry, hit = ArtifactCache(root).get_or_build(FIELDS, lambda d: pytest.fail("rebuilt"))
    assert hit and (entry / "a.bin").read_bytes() == b"whole artifact"


def test_a_live_holder_past_lock_timeout_gets_an_error_naming_the_lock(tmp_path):
    holder = start_builder(tmp_path, sleep=600)
    try:
        wait_for(tmp_path / "started")
        cache = ArtifactCache(tmp_path / "cache", lock_timeout_s=0.5)
        with pytest.raises(CacheLockTimeout, match=r"waited 0.5 s for .*\.lock.*lock_timeout_s=0.5"):
            cache.get_or_build(FIELDS, lambda d: pytest.fail("built while another held the lock"))
        assert cache.lookup(key_of(FIELDS), FIELDS) is None
    finally:
        holder.kill()
        holder.wait(30)


def test_lock_timeout_must_be_positive(tmp_path):
    with pytest.raises(InvalidInputError, match="lock_timeout_s=0; expected seconds > 0"):
        ArtifactCache(tmp_path, lock_timeout_s=0)

