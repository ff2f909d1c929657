"""The S3 endpoint's own ceiling for bench/s3.sh, measured with boto3.

    s3ceiling.py ENDPOINT BUCKET PREFIX MIB SECONDS

Prints one JSON object:
  put_mbps, get_mbps   MIB objects of 1 MiB written, then read back, 8 at a time
  cond_p50_ms, cond_p99_ms, cond_n
                       4 KiB PUTs with If-None-Match: * to new keys, one after
                       another, for SECONDS
  small_put_iops, small_get_iops
                       4 KiB PUTs, then GETs of them, 32 at a time, SECONDS/2 each
"""

import json
import os
import sys
import threading
import time

import boto3
from botocore.config import Config

endpoint, bucket, prefix, mib, seconds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
config = Config(max_pool_connections=64, retries={"max_attempts": 1})


session = boto3.session.Session()


def client():
    return session.client("s3", endpoint_url=endpoint, config=config)


def in_parallel(clients, items, work):
    """Runs work(item, s3) for every item, one thread per client; returns the seconds taken."""
    jobs = list(reversed(items))
    lock = threading.Lock()
    errors = []

    def run(s3):
        while True:
            with lock:
                if not jobs or errors:
                    return
                item = jobs.pop()
            try:
                work(item, s3)
            except Exception as e:  # reported once the others stop
                with lock:
                    errors.append(e)
                return
    ts = [threading.Thread(target=run, args=(s3,)) for s3 in clients]
    start = time.monotonic()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]
    return time.monotonic() - start


def until(clients, duration, work):
    """Runs work(s3, k, n) on one thread per client for `duration` seconds; returns calls per second."""
    stop = time.monotonic() + duration
    counts = [0] * len(clients)
    errors = []

    def run(k):
        try:
            while time.monotonic() < stop:
                work(clients[k], k, counts[k])
                counts[k] += 1
        except Exception as e:
            errors.append(e)
    ts = [threading.Thread(target=run, args=(k,)) for k in range(len(clients))]
    start = time.monotonic()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]
    return sum(counts) / (time.monotonic() - start), counts


one_mib = os.urandom(1 << 20)
small = os.urandom(4096)
out = {}

# Clients are made before any clock starts: making one takes a while.
clients = [client() for _ in range(32)]
keys = [f"{prefix}/big/{i:06d}" for i in range(mib)]
t = in_parallel(clients[:8], keys, lambda k, s3: s3.put_object(Bucket=bucket, Key=k, Body=one_mib))
out["put_mbps"] = mib * 1.048576 / t


def get(k, s3):
    body = s3.get_object(Bucket=bucket, Key=k)["Body"].read()
    if len(body) != 1 << 20:
        raise RuntimeError(f"GET {k}: {len(body)} bytes")


t = in_parallel(clients[:8], keys, get)
out["get_mbps"] = mib * 1.048576 / t

s3 = clients[0]
for i in range(3):  # connection set-up is not part of the figure
    s3.put_object(Bucket=bucket, Key=f"{prefix}/warm/{i}", Body=small, IfNoneMatch="*")
lat = []
stop = time.monotonic() + seconds
while time.monotonic() < stop:
    t0 = time.monotonic()
    s3.put_object(Bucket=bucket, Key=f"{prefix}/cond/{len(lat):08d}", Body=small, IfNoneMatch="*")
    lat.append((time.monotonic() - t0) * 1000)
lat.sort()
out["cond_n"] = len(lat)
out["cond_p50_ms"] = lat[len(lat) // 2]
out["cond_p99_ms"] = lat[min(len(lat) - 1, len(lat) * 99 // 100)]

out["small_put_iops"], counts = until(
    clients, seconds / 2, lambda s3, k, n: s3.put_object(Bucket=bucket, Key=f"{prefix}/small/{k}/{n}", Body=small))
written = [(k, n) for k in range(32) for n in range(counts[k])]


def get_small(s3, k, n):
    kk, nn = written[(k * 7919 + n * 104729) % len(written)]
    s3.get_object(Bucket=bucket, Key=f"{prefix}/small/{kk}/{nn}")["Body"].read()


out["small_get_iops"], _ = until(clients, seconds / 2, get_small)
print(json.dumps(out))
