#!/usr/bin/env python3
"""Render the Helm chart into deploy/ (for `kubectl apply -k deploy/`).

    tests/chart/render.py          write deploy/s3blk.yaml
    tests/chart/render.py --check  exit 1 when deploy/ is out of date

Uses helm-python-sdk (Helm v4 embedded): no helm binary needed.
"""
import pathlib
import sys

import helm_python

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "s3blk"
OUT = ROOT / "deploy" / "s3blk.yaml"
HEADER = "# Rendered from charts/s3blk by tests/chart/render.py with default values. Do not edit.\n"


def render(values=None, namespace="kube-system"):
    chart = helm_python.Chart.load(str(CHART))
    out = chart.render(values or {}, name="s3blk", namespace=namespace, is_install=True)
    docs = []
    for path in sorted(out):
        text = out[path].strip()
        if path.endswith("NOTES.txt") or not text:
            continue
        docs.append(f"# Source: {path}\n{text}\n")
    return HEADER + "---\n".join(docs)


def main():
    text = render()
    if "--check" in sys.argv:
        if not OUT.exists() or OUT.read_text() != text:
            print("deploy/s3blk.yaml is out of date: run tests/chart/render.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
