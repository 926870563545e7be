"""A client of a bitsearch server (HTTP only): submit, follow, list, cancel and download jobs.

    bitsearch submit MODEL.pt2 --data fashion-mnist --method sqnr --budget avg_wbits=3 --wait
    bitsearch jobs | watch ID | cancel ID
    bitsearch download CANDIDATE_ID [-o FILE | -o DIR/] [--format config|packed|onnx]
    bitsearch login KEY

The server is --server, else $BITSEARCH_SERVER, else http://127.0.0.1:8000. The API key is --api-key, else
$BITSEARCH_API_KEY, else the first key file of: $BITSEARCH_VAR_DIR/local.key, ./var/local.key (both written by
`make run`), the user's $XDG_CONFIG_HOME/bitsearch/key (~/.config/bitsearch/key; written by `bitsearch login`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path

from .common import Interrupted, add_spec_arguments, percent, print_json, progress_count, progress_label

DEFAULT_SERVER = "http://127.0.0.1:8000"
FINAL = ("succeeded", "failed", "cancelled")
KEY_FILE = "key"


class ServerError(ValueError):
    """The server refused a request or could not be reached."""


# --- the API key ------------------------------------------------------------------------------------------


def user_key_file() -> Path:
    """$XDG_CONFIG_HOME/bitsearch/key, else ~/.config/bitsearch/key."""
    base = os.environ.get("XDG_CONFIG_HOME")
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".config"
    return root / "bitsearch" / KEY_FILE


def key_files() -> list[Path]:
    """Where a key is looked for, first match wins: the local server's key, then the user's."""
    files = []
    if os.environ.get("BITSEARCH_VAR_DIR"):
        files.append(Path(os.environ["BITSEARCH_VAR_DIR"]) / "local.key")
    files.append(Path("var") / "local.key")
    files.append(user_key_file())
    return files


def find_api_key(explicit: str | None = None) -> tuple[str | None, str]:
    """(key, where it came from); (None, "") when there is none."""
    if explicit:
        return explicit, "--api-key"
    if os.environ.get("BITSEARCH_API_KEY"):
        return os.environ["BITSEARCH_API_KEY"], "$BITSEARCH_API_KEY"
    for path in key_files():
        if path.is_file():
            key = path.read_text().strip()
            if key:
                return key, str(path)
    return None, ""


def save_user_key(key: str) -> Path:
    """Write the user's key file, readable by the user only."""
    key = key.strip()
    if not key or any(c.isspace() for c in key):
        raise ValueError("an API key is one word, e.g. bsk_...; got an empty or spaced value")
    path = user_key_file()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an old .part file keeps its mode through O_CREAT
        os.write(fd, (key + "\n").encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


# --- HTTP ---------------------------------------------------------------------------------------------------


class Server:
    """One server and one key; every failure is a ServerError with one line naming it."""

    def __init__(self, url: str, api_key: str | None = None):
        import httpx

        self.url = url.rstrip("/")
        self.key, self.key_source = find_api_key(api_key)
        self._http = httpx.Client(
            base_url=self.url,
            timeout=httpx.Timeout(30.0, read=600.0),
            headers={"Authorization": f"Bearer {self.key}"} if self.key else {},
        )

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs):
        import httpx

        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise ServerError(f"cannot reach {self.url}: {e}") from e
        if resp.status_code >= 400:
            try:
                detail = resp.json().get("detail", resp.text)
            except (ValueError, AttributeError):
                detail = resp.text
            message = f"server answered {resp.status_code}: {detail}"
            if resp.status_code == 401:
                message += (
                    f" (the key from {self.key_source})"
                    if self.key
                    else "; no API key found: pass --api-key, set $BITSEARCH_API_KEY or run `bitsearch login KEY`"
                )
            raise ServerError(message)
        return resp

    def get(self, path: str, **kwargs) -> dict | list:
        return self.request("GET", path, **kwargs).json()


def _is_id(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def submit(
    server: Server, model: str, data: str, spec, validate_top_k: int | None = None, public: bool = False
) -> dict:
    """POST /jobs with a checked JobSpec; `model`/`data` are paths to upload or ids of earlier uploads; data may
    be a built-in name."""
    from search.data import BUILTIN_DATASETS

    options = spec.job_options()
    if validate_top_k is not None:
        options["validate_top_k"] = validate_top_k
    form = {
        "method": spec.method,
        "budget": json.dumps(spec.budget.limits()),
        "options": json.dumps(options),
        "public": "true" if public else "false",
    }
    files, handles = {}, []
    try:
        if Path(model).is_file():
            handles.append(open(model, "rb"))
            files["model"] = (Path(model).name, handles[-1], "application/zip")
        elif _is_id(model):
            form["model_id"] = model
        else:
            raise ValueError(f"model {model!r} is not a file nor the id of an uploaded model")
        if Path(data).is_file():
            handles.append(open(data, "rb"))
            files["data"] = (Path(data).name, handles[-1], "application/octet-stream")
        elif _is_id(data):
            form["dataset_id"] = data
        elif data in BUILTIN_DATASETS:
            form["data_name"] = data
        else:
            raise ValueError(
                f"data {data!r} is not a file, the id of an uploaded data set, nor a built-in "
                f"({', '.join(BUILTIN_DATASETS)})"
            )
        return server.request("POST", "/jobs", data=form, files=files or None).json()
    finally:
        for h in handles:
            h.close()


def _hint(args) -> str:
    """' --server URL' when the server is not the one a bare command reaches."""
    return "" if args.server == _default_server() else f" --server {args.server}"


def wait(server: Server, job_id: str, hint: str = "", poll_s: float = 1.0, quiet: bool = False) -> dict:
    """Follow the job with a live progress bar until it ends; returns the final job. Ctrl-C stops following,
    not the job: Interrupted says so and how to cancel it."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    try:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[count]}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            disable=quiet,
        ) as bar:
            task = bar.add_task("", total=None, count="")
            while True:
                job = server.get(f"/jobs/{job_id}")
                p = job["progress"]
                best = f" best {percent(p['best_val_top1'])}" if p.get("best_val_top1") is not None else ""
                bar.update(
                    task,
                    description=progress_label(job["status"], p.get("phase")) + best,
                    completed=p.get("step") or 0,
                    total=p.get("total") or None,
                    count=progress_count(p.get("step"), p.get("total")),
                )
                if job["status"] in FINAL:
                    return job
                time.sleep(poll_s)
    except KeyboardInterrupt:
        raise Interrupted(
            f"stopped following job {job_id}; it keeps running on the server: "
            f"`bitsearch cancel {job_id}{hint}` stops it, "
            f"`bitsearch watch {job_id}{hint}` follows it again"
        ) from None


def _show_results(server: Server, job: dict, as_json: bool) -> None:
    """The candidate table (or JSON) of a finished job; a job that did not succeed is an error."""
    from rich.console import Console
    from rich.table import Table

    cands = server.get(f"/jobs/{job['id']}/candidates", params={"sort": "avg_wbits"})
    budgets = job.get("budgets") or [job["budget"]]
    swept = len(budgets) > 1
    if as_json:
        print(json.dumps({"job": job, "candidates": cands}))
    else:
        out = Console()
        table = Table(title=f"job {job['id']}: {job['status']}")
        columns = ("id", "avg bits", "weight bytes", "val top-1 %", "kernel top-1 %", *(("budget",) if swept else ()))
        for col in (*columns, "pareto"):
            table.add_column(col, justify="right")
        for cnd in cands:
            v = cnd.get("validation") or {}
            table.add_row(
                str(cnd["id"]),
                f"{cnd['avg_wbits']:.3f}",
                str(cnd["weight_bytes"]),
                "-" if cnd["val_top1"] is None else f"{100 * cnd['val_top1']:.2f}",
                "-" if v.get("top1") is None else f"{100 * v['top1']:.2f}",
                *((f"#{cnd['budget']}" if cnd.get("budget") is not None else "-",) if swept else ()),
                ("yes" if cnd["pareto"] else "") + (" *" if cnd["recommended"] else ""),
            )
        out.print(table)
        if job["error"]:
            out.print(f"[red]{job['error']}[/red]")
        if swept:
            for line in budget_lines(budgets, cands):
                out.print(line)
        else:
            rec = next((c for c in cands if c["recommended"]), None)
            if rec:
                out.print(f"recommended: candidate {rec['id']} (bitsearch download {rec['id']})")
    if job["status"] != "succeeded":
        raise ServerError(f"job {job['id']} {job['status']}: {job['error'] or 'no reason given'}")


def budget_lines(budgets: list[dict], cands: list[dict]) -> list[str]:
    """One line per budget of a swept job: its recommended candidate (CandidateOut.recommended_for)."""
    lines = []
    for i, limits in enumerate(budgets):
        label = ", ".join(f"{k} <= {v:g}" for k, v in limits.items())
        rec = next((c for c in cands if i in (c.get("recommended_for") or [])), None)
        if rec is None:
            lines.append(f"budget #{i} ({label}): no recommendation recorded")
        else:
            top1 = "" if rec["val_top1"] is None else f", val top-1 {100 * rec['val_top1']:.2f}%"
            lines.append(
                f"budget #{i} ({label}): candidate {rec['id']}, {rec['avg_wbits']:.3f} avg bits{top1} "
                f"(bitsearch download {rec['id']})"
            )
    return lines


DOWNLOAD_SUFFIX = {"config": ".json", "packed": "-packed.zip", "onnx": ".onnx"}


def download_path(candidate_id: int, output: str | None, packed: bool = False, fmt: str | None = None) -> Path:
    """-o as given; an existing directory, or a name ending in '/', gets the default file name inside it."""
    fmt = fmt or ("packed" if packed else "config")
    name = f"bitsearch-candidate-{candidate_id}{DOWNLOAD_SUFFIX[fmt]}"
    if not output:
        return Path(name)
    out = Path(output)
    if out.is_dir() or output.endswith(("/", os.sep)):
        out.mkdir(parents=True, exist_ok=True)
        return out / name
    return out


def download(server: Server, candidate_id: int, out: Path, packed: bool = False, fmt: str | None = None) -> Path:
    fmt = fmt or ("packed" if packed else "config")
    resp = server.request("GET", f"/candidates/{candidate_id}/export", params={"format": fmt})
    tmp = out.with_name(out.name + ".part")
    tmp.write_bytes(resp.content)
    os.replace(tmp, out)
    return out


# --- commands -------------------------------------------------------------------------------------------


def cmd_submit(args) -> None:
    spec, validate_top_k = submit_spec(args)  # refused here, before any upload
    with Server(args.server, args.api_key) as server:
        try:
            created = submit(server, args.model, args.data, spec, validate_top_k, args.public)
        except KeyboardInterrupt:
            raise Interrupted(
                f"interrupted before the server answered; `bitsearch jobs{_hint(args)}` shows "
                "whether the job was queued"
            ) from None
        if not args.wait:
            print(
                json.dumps(created) if args.json else f"job {created['id']} queued: {server.url}{created['location']}"
            )
            return
        print(f"job {created['id']} submitted to {server.url}", file=sys.stderr, flush=True)
        job = wait(server, created["id"], _hint(args), quiet=args.json)
        _show_results(server, job, args.json)


def submit_spec(args) -> tuple:
    """(the JobSpec, validate_top_k) of `submit`: validate_top_k is the server's own option, not the search's,
    from --validate-top-k or --options."""
    from search.spec import make_spec

    from .common import spec_fields

    fields = spec_fields(args)
    top_k = fields.pop("validate_top_k", None)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)):
        raise ValueError(f"validate_top_k must be an integer, got {top_k!r}")
    return make_spec(**fields), args.validate_top_k if args.validate_top_k is not None else top_k


def cmd_watch(args) -> None:
    with Server(args.server, args.api_key) as server:
        job = wait(server, args.job_id, _hint(args), quiet=args.json)
        _show_results(server, job, args.json)


def cmd_jobs(args) -> None:
    from rich.console import Console
    from rich.table import Table

    params = {"limit": args.limit, **({"status": args.status} if args.status else {})}
    with Server(args.server, args.api_key) as server:
        page = server.get("/jobs", params=params)
    if args.json:
        print_json(page)
        return
    if not page["items"]:
        print("no jobs" + (f" with status {args.status}" if args.status else ""))
        return
    table = Table(title=f"{len(page['items'])} of {page['total']} jobs, newest first")
    for col in ("id", "status", "method", "progress", "created"):
        table.add_column(col, no_wrap=col == "id")
    for job in page["items"]:
        p = job["progress"]
        progress = " ".join(
            x
            for x in (
                progress_count(p.get("step"), p.get("total")),
                "" if p.get("phase") == job["status"] else p.get("phase") or "",
            )
            if x
        )
        table.add_row(job["id"], job["status"], job["method"], progress, _local_time(job["created_at"]))
    Console().print(table)


def _local_time(iso: str) -> str:
    try:
        return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    except (TypeError, ValueError):
        return str(iso)


def cmd_cancel(args) -> None:
    with Server(args.server, args.api_key) as server:
        job = server.request("POST", f"/jobs/{args.job_id}/cancel").json()
    if args.json:
        print_json(job)
    elif job["status"] == "cancelled":
        print(f"job {job['id']} cancelled")
    else:
        print(
            f"job {job['id']}: cancel requested; the search stops at its next step "
            f"(`bitsearch watch {job['id']}{_hint(args)}` follows it)"
        )


def cmd_download(args) -> None:
    fmt = args.format or ("packed" if args.packed else "config")
    out = download_path(args.candidate_id, args.output, fmt=fmt)
    with Server(args.server, args.api_key) as server:
        download(server, args.candidate_id, out, fmt=fmt)
    print(out)


def cmd_login(args) -> None:
    key = args.key
    if key is None or key == "-":
        if sys.stdin.isatty():
            import getpass

            key = getpass.getpass("API key: ")
        else:
            key = sys.stdin.readline()
    path = save_user_key(key)
    print(f"saved the key to {path}")
    if (found := find_api_key()[1]) != str(path):
        print(f"note: here {found} takes precedence over it", file=sys.stderr)


# --- the parser ---------------------------------------------------------------------------------------------


def _default_server() -> str:
    return os.environ.get("BITSEARCH_SERVER") or DEFAULT_SERVER


def _connection() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("server")
    g.add_argument(
        "--server",
        default=_default_server(),
        metavar="URL",
        help=f"the bitsearch server (default: $BITSEARCH_SERVER, else {DEFAULT_SERVER}; now {_default_server()})",
    )
    g.add_argument(
        "--api-key",
        metavar="KEY",
        help="default: $BITSEARCH_API_KEY, else the first key file of $BITSEARCH_VAR_DIR/local.key, "
        "./var/local.key (`make run` writes it), the file `bitsearch login` writes "
        f"({user_key_file()})",
    )
    return p


def register(sub: argparse._SubParsersAction) -> None:
    conn = _connection()
    p = sub.add_parser("submit", parents=[conn], help="submit a search to a bitsearch server")
    p.add_argument("model", help="a .pt2 file to upload, or the id of a model uploaded before")
    p.add_argument("--data", required=True, help="'fashion-mnist', a safetensors file, or a data set id")
    add_spec_arguments(p)
    p.add_argument(
        "--validate-top-k",
        type=int,
        metavar="K",
        help="Pareto candidates the server runs on the real kernels (server default if unset)",
    )
    p.add_argument("--public", action="store_true", help="show the job on everyone's leaderboard")
    p.add_argument(
        "--wait",
        action="store_true",
        help="follow the job with a progress bar, then print the results "
        "(Ctrl-C stops following; the job keeps running)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("jobs", parents=[conn], help="list your jobs on a server, newest first")
    p.add_argument("--status", help="queued | running | succeeded | failed | cancelled")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("watch", parents=[conn], help="follow a job with a progress bar, then print its results")
    p.add_argument("job_id", metavar="ID")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("cancel", parents=[conn], help="cancel a queued or running job")
    p.add_argument("job_id", metavar="ID")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser(
        "download", parents=[conn], help="download a candidate's config, packed model or ONNX model from a server"
    )
    p.add_argument("candidate_id", type=int)
    p.add_argument(
        "-o", "--output", help="a file, or a directory (existing, or ending in /) to write the default file name into"
    )
    p.add_argument(
        "--format",
        choices=sorted(DOWNLOAD_SUFFIX),
        help="config: the bit-width config JSON (default); packed: the low-bit model for bitsearch's kernels (zip); "
        "onnx: the ONNX QDQ model for onnxruntime (both once the candidate is validated)",
    )
    p.add_argument("--packed", action="store_true", help="the same as --format packed")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("login", help=f"save an API key for the client commands ({user_key_file()}, mode 0600)")
    p.add_argument("key", nargs="?", metavar="KEY", help="the key (bsk_...); omitted or '-': read from stdin")
    p.set_defaults(func=cmd_login)
