"""Trial records on a *slow* S3 endpoint: a latency-injecting TCP proxy (threads of this test, a
real network hop) in front of moto's server (the `s3_endpoint` fixture), real HTTP through s3fs.

1. slow: every response held 0.2-0.4 s, and 3 requests never answered (the client's read
   timeout, 1 s here through the user's `FSSPEC_S3` `config_kwargs`, ends them): every write
   completes, every record's weights verify, and each stalled request shows up as a WARNING
   (`S3 request GetObject to <bucket/key> failed (ReadTimeoutError), retrying (attempt 2/5)`)
   without a credential or signature in it;
2. the endpoint stalls for good at different points of a write (the weights, their read-back,
   the JSON, the rename): `RecordError` within the time limit of one write
   (`PERL_RECORD_TIMEOUT_S`, 4 s here; 300 s by default), naming the record and the step; no JSON
   appears unless the rename itself reached the store (then the record is whole: its weights
   were verified before), and `iter_records` yields nothing incomplete.

The proxy shuts down in the fixture's `finally`: its listening socket and every connection are
closed, and its threads (daemons, polling with short socket timeouts) end.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import random
import socket
import threading
import time
import uuid
from urllib.parse import urlsplit

import pytest

from .test_s3_outage import _blob, _record

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(300)]

boto3 = pytest.importorskip("boto3")
s3fs = pytest.importorskip("s3fs")

READ_TIMEOUT_S = 1.0  # the user's per-request read timeout (s3fs's default is 15 s)
LIMIT_S = 4.0  # PERL_RECORD_TIMEOUT_S for the stall test
SECRET = "slow-test-secret-value"


class SlowProxy:
    """A TCP proxy to `upstream` that holds each HTTP response a random `delay` (seconds, a
    range), and never forwards a stalled response: it holds it until the client gives up and
    closes, or the proxy closes. Stalled: the final responses whose index (over all connections,
    from 0) is in `stall`, and every response after `stall_from(k)`. `log` lists (index of the
    response, request line without query, 'stalled' | 'ok')."""

    POLL_S = 0.2

    def __init__(self, upstream: tuple[str, int], delay=(0.0, 0.0), seed: int = 0):
        self.upstream, self.delay, self.rng = upstream, delay, random.Random(seed)
        self.stall: set[int] = set()  # indices of final responses (not `100 Continue`)
        self.stall_all_from = 10**9  # index of the first response of a stall for good
        self.responses = self.finals = 0
        self.log: list[tuple[int, str, str]] = []
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.socks: set[socket.socket] = set()
        self.threads: list[threading.Thread] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(self.POLL_S)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self._thread(self._accept)

    @property
    def stalled(self) -> list[str]:
        with self.lock:
            return [line for _, line, what in self.log if what == "stalled"]

    def stall_from(self, k: int | None) -> None:
        """Stall every response (a `100 Continue` too) from the k-th next one (0: the next) on;
        None: no more."""
        with self.lock:
            self.stall_all_from = 10**9 if k is None else self.responses + k

    def _thread(self, fn, *args) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        with self.lock:
            self.threads.append(t)
        t.start()

    def _own(self, s: socket.socket) -> socket.socket:
        s.settimeout(self.POLL_S)  # every blocking call returns often enough to see `closed`
        with self.lock:
            self.socks.add(s)
        return s

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:  # the listener was closed
                return
            self._thread(self._pump, self._own(client))

    def _pump(self, client: socket.socket) -> None:
        try:
            upstream = self._own(socket.create_connection(self.upstream, timeout=5))
        except OSError:
            client.close()
            return
        gone = threading.Event()  # the client closed (or the proxy did)
        requests: collections.deque[str] = collections.deque()

        def forward():  # client -> server, as is
            try:
                while not (self.closed.is_set() or gone.is_set()):
                    try:
                        data = client.recv(65536)
                    except socket.timeout:
                        continue
                    if not data:
                        break
                    if data[:8].split(b" ")[0] in (b"GET", b"PUT", b"HEAD", b"POST",
                                                   b"DELETE"):
                        line = data.split(b"\r\n", 1)[0].decode("latin-1")
                        method, target = line.split(" ")[:2]
                        requests.append(f"{method} {target.split('?')[0]}")
                    upstream.sendall(data)
            except OSError:
                pass
            gone.set()

        self._thread(forward)
        try:
            while not (self.closed.is_set() or gone.is_set()):
                try:
                    data = upstream.recv(65536)
                except socket.timeout:
                    continue
                if not data:
                    break
                if data.startswith(b"HTTP/"):  # a response starts (one per request, in order,
                    # after an interim `100 Continue` for an upload that asked for one)
                    interim = data.startswith((b"HTTP/1.1 100", b"HTTP/1.0 100"))
                    with self.lock:
                        i, self.responses = self.responses, self.responses + 1
                        if not interim:
                            n, self.finals = self.finals, self.finals + 1
                        stall = i >= self.stall_all_from or (not interim and n in self.stall)
                        wait = self.rng.uniform(*self.delay)
                        line = (requests[0] + " (100 Continue)" if interim else
                                requests.popleft()) if requests else "?"
                        self.log.append((i, line, "stalled" if stall else "ok"))
                    if stall:  # never answered: wait for the client to give up
                        while not (gone.wait(self.POLL_S) or self.closed.is_set()):
                            pass
                        break
                    if self.closed.wait(wait):
                        break
                client.sendall(data)
        except OSError:
            pass
        finally:
            gone.set()
            for s in (client, upstream):
                with self.lock:
                    self.socks.discard(s)
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self.closed.set()
        self.listener.close()
        with self.lock:
            socks, threads = list(self.socks), list(self.threads)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in threads:
            t.join(5)
        assert not any(t.is_alive() for t in threads), "a proxy thread did not end"


@pytest.fixture
def slow_s3(s3_endpoint, monkeypatch):
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                "PERL_RECORD_TIMEOUT_S"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIASLOWTESTKEY0001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = f"slow-{uuid.uuid4().hex[:10]}"
    direct = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    direct.create_bucket(Bucket=bucket)
    up = urlsplit(s3_endpoint)
    proxy = SlowProxy((up.hostname, up.port), delay=(0.2, 0.4), seed=3)
    try:
        monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", proxy.url)
        # the user's timeouts, merged by perl_core.data.storage.open_fs from the environment;
        # botocore's own retries (5 attempts) and s3fs's (5 tries) are left as they are
        monkeypatch.setenv("FSSPEC_S3", json.dumps({"config_kwargs": {
            "read_timeout": READ_TIMEOUT_S, "connect_timeout": READ_TIMEOUT_S}}))
        s3fs.S3FileSystem.clear_instance_cache()
        yield proxy, f"s3://{bucket}/runs", direct, bucket
    finally:
        proxy.close()
        s3fs.S3FileSystem.clear_instance_cache()


def _stored(direct, bucket: str, experiment: str) -> dict[str, bytes]:
    """name -> bytes of every object under the experiment's records, read around the proxy."""
    prefix = f"runs/records/{experiment.replace('/', '__')}/"
    keys = [o["Key"] for o in direct.list_objects_v2(Bucket=bucket, Prefix=prefix)
            .get("Contents", [])]
    return {k[len(prefix):]: direct.get_object(Bucket=bucket, Key=k)["Body"].read()
            for k in keys}


def _complete(direct, bucket: str, storage: str, experiment: str) -> set[str]:
    """The stems with a JSON; each has its weights with the recorded sha256, and iter_records
    yields exactly these and reports nothing."""
    from pipeline import tracking

    files = _stored(direct, bucket, experiment)
    jsons = {n[:-5] for n in files if n.endswith(".json")}
    for stem in jsons:
        rec = json.loads(files[f"{stem}.json"])
        assert f"{stem}.safetensors" in files, f"{stem}.json is there without its weights"
        assert hashlib.sha256(files[f"{stem}.safetensors"]).hexdigest() == \
            rec["extra"]["projectors_sha256"], stem
    problems: list[str] = []
    found = {r.stem() for r, _ in tracking.iter_records(storage, experiment, problems=problems)}
    assert found == jsons and not problems, (found, jsons, problems)
    return jsons


def _short(request_line: str) -> str:
    """`GET /bucket/.../<stem>.safetensors` -> `GET .safetensors`."""
    method, _, path = request_line.partition(" ")
    name = path.rsplit("/", 1)[-1]
    return f"{method} {name[name.index('.', 1):] if '.' in name[1:] else name}"


def test_slow_endpoint_every_write_completes_and_retries_are_warnings(slow_s3, caplog,
                                                                     monkeypatch):
    from pipeline import tracking

    proxy, storage, direct, bucket = slow_s3
    monkeypatch.setenv("PERL_RECORD_TIMEOUT_S", "60")  # a hang fails the test, not pytest's
    caplog.set_level(logging.WARNING)  # what a trial's log shows: nothing at DEBUG
    # three requests never answered (8 in a write, 9 with a retry): the read-back GET of the
    # first write, the weights PUT of the second, the JSON PUT of the third
    proxy.stall = {3, 10, 22}
    experiment, written, t0 = "rel/s3slow", [], time.monotonic()
    for i in range(3):
        rec = _record(i, experiment)
        assert tracking.write_record(storage, rec, _blob(i)).endswith(f"{rec.stem()}.json")
        written.append(rec.stem())
    spent = time.monotonic() - t0
    stalled = proxy.stalled
    assert len(stalled) == 3, proxy.log
    warnings = [r for r in caplog.records if "retrying (attempt" in r.getMessage()]
    assert all(r.levelno == logging.WARNING for r in warnings)
    # each stalled request: a read timeout, retried, and said so (with the object's path)
    assert len(warnings) >= len(stalled), ([r.getMessage() for r in warnings], stalled)
    for r in warnings:
        msg = r.getMessage()
        assert msg.startswith("S3 request ") and f" to {bucket}/runs/records/" in msg, msg
        assert "(ReadTimeoutError), retrying (attempt 2/" in msg, msg
        for secret in (SECRET, "AKIASLOWTESTKEY0001", "Signature", "Credential", "?"):
            assert secret not in msg, msg
    proxy.stall = set()
    assert _complete(direct, bucket, storage, experiment) == set(written)
    # the user's read timeout reached the client: a stall costs about 1 s, not 15 s
    assert spent < 3 * 15, spent
    print(f"\nslow endpoint: {proxy.responses} responses held 0.2-0.4 s, {len(stalled)} "
          f"never answered ({', '.join(_short(s) for s in stalled)}) and retried after "
          f"the {READ_TIMEOUT_S:g} s read timeout; {len(warnings)} WARNING(s), e.g. "
          f"{warnings[0].getMessage()!r}; {len(written)} writes completed in {spent:.0f} s, "
          f"all verified")


def test_endpoint_stalling_for_good_mid_write_fails_within_the_limit(slow_s3, monkeypatch):
    from pipeline import tracking

    proxy, storage, direct, bucket = slow_s3
    proxy.delay = (0.0, 0.05)
    monkeypatch.setenv("PERL_RECORD_TIMEOUT_S", str(LIMIT_S))
    experiment = "rel/s3stall"
    first = _record(50, experiment)
    tracking.write_record(storage, first, _blob(50))  # the folder exists, the client is open
    sequence = [line.split(" ")[0] + (" (100)" if "100 Continue" in line else "")
                for _, line, _ in proxy.log]
    done, errors, steps = [first.stem()], [], set()
    # a write's responses: HEAD (folder), PUT (weights), HEAD + GET (read back), PUT (JSON
    # under its temporary name), HEAD + PUT (copy to the final name), DELETE (temporary name)
    for i, k in enumerate((0, 1, 3, 4, 6, 7)):  # stall from the k-th response of the write on
        rec = _record(60 + i, experiment)
        proxy.stall_from(k)
        n0 = len(proxy.log)
        t0 = time.monotonic()
        try:
            tracking.write_record(storage, rec, _blob(60 + i))
            done.append(rec.stem())
        except tracking.RecordError as e:
            spent, msg = time.monotonic() - t0, str(e)
            step = msg.split("cannot ", 1)[1].split(" of trial record")[0]
            errors.append((k, step, round(spent, 1)))
            steps.add(step)
            assert f"of trial record {storage}/records/rel__s3stall/{rec.stem()}.json " in msg
            assert f"(PERL_RECORD_TIMEOUT_S={LIMIT_S:g})" in msg and "gave up after" in msg, msg
            assert SECRET not in msg, msg
            assert LIMIT_S - 0.5 < spent < LIMIT_S + 2, (spent, msg)  # the limit, not s3fs's
            if step == "mark the record complete":  # the rename may have reached the store
                assert "may be complete" in msg, msg
            else:
                assert "the record is not marked complete" in msg, msg
        finally:
            proxy.stall_from(None)
        stalled = [line for _, line, what in proxy.log[n0:] if what == "stalled"]
        assert stalled or rec.stem() in done, proxy.log[n0:]
        time.sleep(0.5)  # a cancelled request that the server did take has landed by now
        files = _stored(direct, bucket, experiment)
        if f"{rec.stem()}.json" in files and rec.stem() not in done:
            assert step == "mark the record complete", (step, sorted(files))
            done.append(rec.stem())  # the rename got through: whole (checked just below)
    assert _complete(direct, bucket, storage, experiment) == set(done), (done, errors)
    assert len(errors) >= 4, errors  # the stall did catch writes, at several steps
    assert len(steps) >= 4, errors
    print(f"\nstalled for good mid-write: {len(errors)} RecordError(s) after {LIMIT_S:g} s "
          f"(k, step, s): {errors}; {len(done) - 1} of 6 complete (the copy to the final "
          f"name got through); "
          f"responses of one write: {sequence}; "
          f"0 incomplete records taken as complete")
