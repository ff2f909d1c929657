"""Prints bench/s3.sh's tables from its JSON lines.

    s3report.py RESULTS.jsonl LATENCY_MS

Every ratio is this row's figure divided by the reference's (the endpoint's
ceiling, or the nbdkit S3 plugin on the same endpoint). Request columns are
per operation (the table's title says what one is) and come from the proxy's
counters, so they exist for the proxied endpoint only.
"""

import json
import sys

rows = [json.loads(line) for line in open(sys.argv[1])]
latency = sys.argv[2]
ENDPOINTS = {"direct": "moto", "proxy": f"moto+{latency}ms"}
SYSTEMS = {"ceiling": "ceiling (boto3)", "s3blk-1M": "s3blk 1M chunks", "s3blk-64K": "s3blk 64K chunks",
           "nbdkit-S3": "nbdkit S3 64K", "text-none": "s3blk 1M, none", "text-zstd": "s3blk 1M, zstd",
           "text-nbdkit": "nbdkit S3 64K"}


def find(endpoint, system, scenario):
    for r in rows:
        if (r["endpoint"], r["system"], r["scenario"]) == (endpoint, system, scenario):
            return r
    return None


def ceiling(endpoint, key):
    r = find(endpoint, "ceiling", "ceiling")
    return r["result"][key] if r else None


def requests(r):
    if not r or r["before"] is None or r["after"] is None or not r["ops"]:
        return ["-"] * 5
    d = {k: r["after"][k] - r["before"][k] for k in r["after"]}
    n = r["ops"]
    other = d["HEAD"] + d["POST"] + d["DELETE"] + d["other"]
    return [f"{d['PUT'] / n:.2f}", f"{d['GET'] / n:.2f}", f"{other / n:.2f}",
            f"{d['bytes_up'] / 1024 / n:.0f}", f"{d['bytes_down'] / 1024 / n:.0f}"]


def ratio(a, b):
    return f"{a / b:.2f}" if a is not None and b else "-"


def table(scenario, title, better, columns, value, ceiling_of, with_requests=True):
    """columns: names of the figures value(result) returns; ratios use the first."""
    print(f"\n{title}  ({better} is better)")
    head = ["endpoint", "system"] + columns + ["×ceiling", "×nbdkit"]
    if with_requests:
        head += ["PUT/op", "GET/op", "other/op", "KiB up/op", "KiB down/op"]
    lines = [head]
    for endpoint in ENDPOINTS:
        ceil = ceiling_of(endpoint) if ceiling_of else None
        if ceil is not None:
            c = ceil if isinstance(ceil, tuple) else (ceil,)
            line = [ENDPOINTS[endpoint], SYSTEMS["ceiling"]] + [f"{x:.1f}" for x in c] + ["1.00", "-"]
            if with_requests:
                line += [""] * 5
            lines.append(line)
        nb = find(endpoint, "nbdkit-S3", scenario)
        nbv = value(nb["result"])[0] if nb else None
        for system in ("s3blk-1M", "s3blk-64K", "nbdkit-S3"):
            r = find(endpoint, system, scenario)
            if not r:
                continue
            v = value(r["result"])
            c0 = ceil[0] if isinstance(ceil, tuple) else ceil
            line = [ENDPOINTS[endpoint], SYSTEMS[system]] + [f"{x:.1f}" for x in v] + [ratio(v[0], c0), ratio(v[0], nbv)]
            if with_requests:
                line += requests(r)
            lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for line in lines:
        print("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))))


print("\nendpoint ceiling (boto3): 1 MiB PUT/GET 8 in flight; 4 KiB PUT with If-None-Match: * one at a time; "
      "4 KiB PUT/GET 32 in flight")
for endpoint in ENDPOINTS:
    c = find(endpoint, "ceiling", "ceiling")
    if c:
        c = c["result"]
        print(f"  {ENDPOINTS[endpoint]:<12} PUT {c['put_mbps']:.1f} MB/s  GET {c['get_mbps']:.1f} MB/s  "
              f"conditional PUT p50 {c['cond_p50_ms']:.1f} ms p99 {c['cond_p99_ms']:.1f} ms  "
              f"4 KiB PUT {c['small_put_iops']:.0f}/s GET {c['small_get_iops']:.0f}/s")

table("seqwrite", "1 MiB sequential write, 8 in flight, then FLUSH (op = 1 MiB)", "higher", ["MB/s"],
      lambda r: (r["mbps"],), lambda e: ceiling(e, "put_mbps"))
table("seqread", "1 MiB sequential read, cold (fresh server), 8 in flight (op = 1 MiB)", "higher", ["MB/s"],
      lambda r: (r["mbps"],), lambda e: ceiling(e, "get_mbps"))
table("fsync", "4 KiB random write + FLUSH at QD1, warm cache (op = write + FLUSH); ceiling = conditional 4 KiB PUT",
      "lower", ["p50 ms", "p99 ms"], lambda r: (r["p50_ms"], r["p99_ms"]),
      lambda e: (ceiling(e, "cond_p50_ms"), ceiling(e, "cond_p99_ms")) if ceiling(e, "cond_p50_ms") else None)
table("randwrite-cold", "4 KiB random write at QD32 over the whole volume, cold (op = 4 KiB); ceiling = 4 KiB PUTs 32 in flight",
      "higher", ["IOPS"], lambda r: (r["iops"],), lambda e: ceiling(e, "small_put_iops"))
table("randread-cold", "4 KiB random read at QD32, cold (fresh server) (op = 4 KiB); ceiling = 4 KiB GETs 32 in flight",
      "higher", ["IOPS"], lambda r: (r["iops"],), lambda e: ceiling(e, "small_get_iops"))
table("randread-hot", "4 KiB random read at QD32 over the hot region, after it was read once (op = 4 KiB)", "higher", ["IOPS"],
      lambda r: (r["iops"],), lambda e: ceiling(e, "small_get_iops"))
table("rss", "peak RSS of the server process (VmHWM, MiB)", "lower", ["MiB"], lambda r: (r["kib"] / 1024,), None,
      with_requests=False)


def compressible():
    """The compressible data set: write and cold read MB/s, bytes stored."""
    print("\ncompressible data set (ext4 image of text files): 1 MiB sequential write + FLUSH and cold read, "
          "8 in flight; bytes stored in the bucket afterwards (higher MB/s, fewer bytes are better)")
    head = ["endpoint", "system", "write MB/s", "×nbdkit", "read MB/s", "×nbdkit", "stored MiB", "stored/written",
            "PUT/MiB", "KiB up/MiB"]
    lines = [head]
    for endpoint in ENDPOINTS:
        def mbps(system, scenario):
            r = find(endpoint, system, scenario)
            return r["result"]["mbps"] if r else None
        nw, nr = mbps("text-nbdkit", "seqwrite-text"), mbps("text-nbdkit", "seqread-text")
        for system in ("text-none", "text-zstd", "text-nbdkit"):
            w, rd, st = mbps(system, "seqwrite-text"), mbps(system, "seqread-text"), find(endpoint, system, "stored")
            if w is None:
                continue
            req = requests(find(endpoint, system, "seqwrite-text"))
            stored = st["result"] if st else None
            lines.append([ENDPOINTS[endpoint], SYSTEMS[system], f"{w:.1f}", ratio(w, nw),
                          f"{rd:.1f}" if rd is not None else "-", ratio(rd, nr),
                          f"{stored['bytes'] / 2**20:.1f}" if stored else "-",
                          ratio(stored["bytes"], stored["written"]) if stored else "-", req[0], req[3]])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for line in lines:
        print("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))))


compressible()
