"""`bitsearch submit` and `bitsearch download`: a client for a bitsearch server (HTTP only).

    bitsearch submit MODEL.pt2 --data fashion-mnist --method sqnr --budget avg_wbits=3 --wait
    bitsearch download CANDIDATE_ID [-o config.json] [--packed]

The server is --server, else $BITSEARCH_SERVER, else http://127.0.0.1:8000.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

DEFAULT_SERVER = "http://127.0.0.1:8000"
FINAL = ("succeeded", "failed", "cancelled")


class ServerError(ValueError):
    """The server refused a request or could not be reached."""


_api_key: str | None = None


def api_key() -> str | None:
    """--api-key, else $BITSEARCH_API_KEY, else the embedded default's var/local.key (written by `make run`)."""
    if _api_key:
        return _api_key
    if os.environ.get("BITSEARCH_API_KEY"):
        return os.environ["BITSEARCH_API_KEY"]
    local = Path(os.environ.get("BITSEARCH_VAR_DIR", "var")) / "local.key"
    return local.read_text().strip() if local.is_file() else None


def _client(server: str):
    import httpx

    key = api_key()
    return httpx.Client(base_url=server.rstrip("/"), timeout=httpx.Timeout(30.0, read=600.0),
                        headers={"Authorization": f"Bearer {key}"} if key else {})


def _check(resp) -> dict | bytes:
    if resp.status_code >= 400:
        try:
            detail = resp.json().get("detail", resp.text)
        except ValueError:
            detail = resp.text
        raise ServerError(f"server answered {resp.status_code}: {detail}")
    return resp


def _budget(items: list[str]) -> dict:
    from .cost import Budget

    return Budget.parse(items).limits()


def submit(server: str, model: str, data: str, method: str, budget: dict, options: dict,
           public: bool = False) -> dict:
    """POST /jobs; `model`/`data` are paths to upload or ids of earlier uploads; data may be a built-in name."""
    import httpx

    files, form = {}, {"method": method, "budget": json.dumps(budget), "options": json.dumps(options),
                       "public": "true" if public else "false"}
    handles = []
    try:
        if Path(model).is_file():
            handles.append(open(model, "rb"))
            files["model"] = (Path(model).name, handles[-1], "application/zip")
        else:
            form["model_id"] = model
        if Path(data).is_file():
            handles.append(open(data, "rb"))
            files["data"] = (Path(data).name, handles[-1], "application/octet-stream")
        elif len(data) == 64 and all(c in "0123456789abcdef" for c in data):
            form["dataset_id"] = data
        else:
            form["data_name"] = data
        with _client(server) as c:
            try:
                return _check(c.post("/jobs", data=form, files=files or None)).json()
            except httpx.TransportError as e:
                raise ServerError(f"cannot reach {server}: {e}") from e
    finally:
        for h in handles:
            h.close()


def wait(server: str, job_id: str, poll_s: float = 1.0, quiet: bool = False) -> dict:
    """Poll the job until it ends, with a live progress bar; returns the final job."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with _client(server) as c, Progress(TextColumn("{task.description}"), BarColumn(),
                                        TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                                        disable=quiet, transient=False) as bar:
        task = bar.add_task("queued", total=None)
        while True:
            job = _check(c.get(f"/jobs/{job_id}")).json()
            p = job["progress"]
            best = f" best {100 * p['best_val_top1']:.2f}%" if p.get("best_val_top1") is not None else ""
            bar.update(task, description=f"{job['status']}: {p['phase']}{best}", completed=p["step"],
                       total=p["total"] or None)
            if job["status"] in FINAL:
                return job
            time.sleep(poll_s)


def candidates(server: str, job_id: str) -> list[dict]:
    with _client(server) as c:
        return _check(c.get(f"/jobs/{job_id}/candidates", params={"sort": "avg_wbits"})).json()


def download(server: str, candidate_id: int, out: Path, packed: bool = False) -> Path:
    with _client(server) as c:
        resp = _check(c.get(f"/candidates/{candidate_id}/{'packed' if packed else 'config'}"))
    tmp = out.with_name(out.name + ".part")
    tmp.write_bytes(resp.content)
    os.replace(tmp, out)
    return out


def _use_key(args) -> None:
    global _api_key
    _api_key = args.api_key


def cmd_submit(args) -> None:
    _use_key(args)
    from rich.console import Console
    from rich.table import Table

    options = json.loads(args.options) if args.options else {}
    if not isinstance(options, dict):
        raise ValueError("--options must be a JSON object")
    for key in ("seed", "calib_size", "val_samples", "validate_top_k"):
        value = getattr(args, key)
        if value is not None:
            options[key] = value
    for key in ("w_bits", "a_bits"):
        text = getattr(args, key)
        if text:
            from .cli import _parse_bits
            options[key] = _parse_bits(text)
    created = submit(args.server, args.model, args.data, args.method, _budget(args.budget), options, args.public)
    out = Console()
    if not args.wait:
        print(json.dumps(created) if args.json else f"job {created['id']} queued: {args.server}{created['location']}")
        return
    job = wait(args.server, created["id"], quiet=args.json)
    cands = candidates(args.server, job["id"])
    if args.json:
        print(json.dumps({"job": job, "candidates": cands}))
    else:
        table = Table(title=f"job {job['id']}: {job['status']}")
        for col in ("id", "avg bits", "weight bytes", "val top-1 %", "kernel top-1 %", "pareto"):
            table.add_column(col, justify="right")
        for cnd in cands:
            v = cnd.get("validation") or {}
            table.add_row(str(cnd["id"]), f"{cnd['avg_wbits']:.3f}", str(cnd["weight_bytes"]),
                          "-" if cnd["val_top1"] is None else f"{100 * cnd['val_top1']:.2f}",
                          "-" if v.get("top1") is None else f"{100 * v['top1']:.2f}",
                          ("yes" if cnd["pareto"] else "") + (" *" if cnd["recommended"] else ""))
        out.print(table)
        if job["error"]:
            out.print(f"[red]{job['error']}[/red]")
        rec = next((c for c in cands if c["recommended"]), None)
        if rec:
            out.print(f"recommended: candidate {rec['id']} (bitsearch download {rec['id']})")
    if job["status"] != "succeeded":
        raise ServerError(f"job {job['id']} {job['status']}: {job['error'] or 'no reason given'}")


def cmd_download(args) -> None:
    _use_key(args)
    out = Path(args.output or f"bitsearch-candidate-{args.candidate_id}{'-packed.zip' if args.packed else '.json'}")
    download(args.server, args.candidate_id, out, args.packed)
    print(out)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the client commands to the `bitsearch` parser."""
    server = os.environ.get("BITSEARCH_SERVER", DEFAULT_SERVER)
    p = sub.add_parser("submit", help="submit a search to a bitsearch server")
    p.add_argument("model", help="a .pt2 file to upload, or the id of a model uploaded before")
    p.add_argument("--data", required=True, help="'fashion-mnist', a safetensors file, or a data set id")
    p.add_argument("--method", required=True, help="imprinting | sqnr | haq | uniform | random")
    p.add_argument("--budget", action="append", required=True, help="NAME=VALUE, repeatable (e.g. avg_wbits=3)")
    p.add_argument("--w-bits", help="weight bit choices, e.g. 2-8")
    p.add_argument("--a-bits", help="activation bit choices, e.g. 8 or 4-8")
    p.add_argument("--seed", type=int)
    p.add_argument("--calib-size", type=int)
    p.add_argument("--val-samples", type=int)
    p.add_argument("--validate-top-k", type=int, help="Pareto candidates to run on the real kernels")
    p.add_argument("--options", help="more options as JSON (e.g. '{\"params\": {\"episodes\": 50}}')")
    p.add_argument("--server", default=server)
    p.add_argument("--api-key", help="default: $BITSEARCH_API_KEY, else var/local.key of `make run`")
    p.add_argument("--public", action="store_true", help="show the job on everyone's leaderboard")
    p.add_argument("--wait", action="store_true", help="follow the job with a progress bar, then print the results")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("download", help="download a candidate's config (or --packed model) from a server")
    p.add_argument("candidate_id", type=int)
    p.add_argument("-o", "--output")
    p.add_argument("--packed", action="store_true", help="the packed low-bit model (zip) instead of the config")
    p.add_argument("--server", default=server)
    p.add_argument("--api-key", help="default: $BITSEARCH_API_KEY, else var/local.key of `make run`")
    p.set_defaults(func=cmd_download)


if __name__ == "__main__":
    from .cli import main

    sys.exit(main(["submit", *sys.argv[1:]]))
