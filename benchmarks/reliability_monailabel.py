"""MONAI Label under load and hostile uploads (issue 18, items 3 and 4): a real monailabel 0.8.5 server, loopback only.

Runs with the interpreter of the MONAI Label env that ``scripts/e2e_monailabel.sh`` builds (and reuses its server
set-up: studies, app, bundle copies, start / stop by process group, HTTP helpers)::

    E2E_SCRIPT=benchmarks/reliability_monailabel.py KEEP_WORKDIR=1 bash scripts/e2e_monailabel.sh
    # or, with the env already built:
    ~/.cache/monai-vlmfilm/monailabel-venv/bin/python benchmarks/reliability_monailabel.py \\
        --workdir /tmp/ml-reliability --out benchmarks/results/reliability_monailabel

What it does, with bounded request counts and an overall deadline (``--max-wall``), then stops the server's whole
process group:

1. Server: the ``monaibundle`` app with three copies of ``bundle/`` and its shipped weights: ``vlmfilm_on``
   (``use_vlm_film: true``), ``vlmfilm_off`` (false) and ``vlmfilm_train`` (on; only this one is trained, so the
   served weights of the other two never change and every answer can be compared). For CPU speed the studies are
   small synthetic angiograms (``--size``, default 64 px) and requests ask for ``num_samples`` 1 (a per-request
   option of the bundle); the network is the shipped one.
2. Reference: one request per (image, variant) from a single client; variants are ``vlmfilm_on``, ``vlmfilm_off``
   and ``vlmfilm_on`` with the request switch ``use_vlm_film: false``.
3. Load: ``--clients`` threads x ``--requests`` ``/infer`` each, variants and images interleaved so that
   concurrent requests differ; latency percentiles, errors, masks compared with the reference byte for byte
   (decoded); server RSS sampled. Then the same while ``/train`` runs on ``vlmfilm_train`` (stopped afterwards).
4. Hostile uploads (``file`` of ``/infer``, both models): truncated PNG, zero bytes, text named ``.png``, 16-bit
   PNG, RGB PNG, an 8000 x 8000 PNG, a NaN NIfTI, an upload named ``../../../escape.png``, image ids
   ``../../etc/passwd`` and ``/etc/passwd``; each followed by a normal request whose mask must equal the
   reference. Then the datastore upload routes with ``../`` in the image id and the label tag (MONAI Label's own
   code, no bundle involved). The file tree of the work folder is listed before and after: anything new outside
   ``studies/`` and the model folders is reported.

Results: ``<out>.json`` (everything) and ``<out>.md`` (tables). Exit status 0 when every target was met.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import e2e_monailabel as e2e  # noqa: E402 - the one home of the server set-up and HTTP helpers

HOST = e2e.HOST
VARIANTS: list[tuple[str, str, dict]] = [  # (label, model, extra request params)
    ("on", "vlmfilm_on", {}),
    ("off", "vlmfilm_off", {}),
    ("on+request_off", "vlmfilm_on", {"use_vlm_film": False}),
]


def log(msg: str) -> None:
    print(f"[ml-rel {time.strftime('%H:%M:%S')}] {msg}", flush=True)


post_infer, decode_mask, detail = e2e.post_infer, e2e.decode_mask, e2e.detail


# --------------------------------------------------------------------------------------------- server
def server_rss_mb(pgid: int) -> float:
    """Resident memory of the server process (the ``start_server`` process of the group with the most RSS)."""
    out = subprocess.run(["ps", "-eo", "pid=,pgid=,rss=,args="], capture_output=True, text=True, check=True).stdout
    best = 0
    for line in out.splitlines():
        parts = line.split(None, 3)
        if len(parts) == 4 and parts[1] == str(pgid) and "start_server" in parts[3]:
            best = max(best, int(parts[2]))
    return best / 1024.0


def train_status(base: str) -> dict:
    try:
        _, _, data = e2e.http("GET", f"{base}/train/", timeout=30)
        return json.loads(data) if data else {}
    except urllib.error.HTTPError as e:
        return {"status": f"HTTP {e.code}"}


def tree(root: Path) -> dict[str, int]:
    """Every file under ``root`` (relative path -> size), symlinks not followed."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            try:
                out[str(p.relative_to(root))] = p.lstat().st_size
            except OSError:
                pass
    return out


# ----------------------------------------------------------------------------------------------- load
def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    v = sorted(values)

    def q(p: float) -> float:
        return round(v[min(len(v) - 1, max(0, int(round(p / 100.0 * len(v) + 0.5)) - 1))], 3)

    return {"p50": q(50), "p95": q(95), "p99": q(99), "max": round(v[-1], 3), "mean": round(statistics.mean(v), 3)}


def load_phase(
    base: str,
    pgid: int,
    image_ids: list[str],
    refs: dict[tuple[str, str], Any],
    params: dict,
    clients: int,
    requests: int,
    deadline: float,
) -> dict[str, Any]:
    """``clients`` threads x ``requests`` ``/infer``; every answer is checked against the single-client mask."""
    import numpy as np

    results: list[dict] = []
    lock = threading.Lock()
    stop = threading.Event()
    rss_samples: list[tuple[float, float]] = []
    t_start = time.time()

    def sampler() -> None:
        while not stop.wait(2.0):
            rss_samples.append((round(time.time() - t_start, 1), round(server_rss_mb(pgid), 1)))

    def client(c: int) -> None:
        for k in range(requests):
            if time.time() > deadline:
                with lock:
                    results.append({"client": c, "k": k, "skipped": True})
                continue
            label, model, extra = VARIANTS[(c + k) % len(VARIANTS)]
            image_id = image_ids[(3 * c + k) % len(image_ids)]
            status, data, dt = post_infer(base, model, {**params, **extra}, image_id=image_id)
            rec: dict[str, Any] = {"client": c, "k": k, "variant": label, "image": image_id, "status": status}
            rec["latency_s"] = dt
            if status == 200:
                try:
                    mask = decode_mask(data)
                    ref = refs[(label, image_id)]
                    rec["same_as_reference"] = bool(mask.shape == ref.shape and np.array_equal(mask, ref))
                except Exception as e:  # noqa: BLE001 - an undecodable answer is a wrong mask
                    rec["same_as_reference"] = False
                    rec["error"] = f"undecodable answer: {e}"
            else:
                rec["error"] = detail(data)
            with lock:
                results.append(rec)

    rss_before = server_rss_mb(pgid)
    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - t0
    stop.set()
    th.join()
    rss_after = server_rss_mb(pgid)
    done = [r for r in results if not r.get("skipped")]
    ok = [r for r in done if r["status"] == 200]
    out: dict[str, Any] = {
        "requests": clients * requests,
        "sent": len(done),
        "skipped_after_deadline": len(results) - len(done),
        "failed": len(done) - len(ok),
        "failed_examples": [f"{r['status']}: {r.get('error', '')[:200]}" for r in done if r["status"] != 200][:5],
        "wrong_masks": sum(1 for r in ok if not r.get("same_as_reference")),
        "wall_s": round(wall, 1),
        "throughput_rps": round(len(done) / wall, 2) if wall else None,
        "latency_s": percentiles([r["latency_s"] for r in ok]),
        "latency_s_by_variant": {
            v: percentiles([r["latency_s"] for r in ok if r["variant"] == v]) for v, _, _ in VARIANTS
        },
        "rss_mb_before": round(rss_before, 1),
        "rss_mb_after": round(rss_after, 1),
        "rss_mb_samples": rss_samples,
    }
    return out


# -------------------------------------------------------------------------------------------- hostile
def hostile_phase(
    base: str,
    studies: Path,
    ref_id: str,
    refs: dict[tuple[str, str], Any],
    params: dict,
    skip: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Every hostile input of ``e2e_monailabel.HOSTILE_EXPECTED`` (except ``skip``) on the FiLM-on and -off models."""
    names = tuple(n for n in e2e.HOSTILE_EXPECTED if n not in skip)
    rows = []
    for label, model, _extra in VARIANTS[:2]:
        rows += e2e.hostile_uploads(
            base, model, params, studies / f"{ref_id}.png", ref_id, refs[(label, ref_id)], names, log_fn=log
        )
    return {"infer_uploads": rows}


def datastore_phase(base: str, uploads_png: bytes, image_id: str) -> list[dict[str, Any]]:
    """MONAI Label's own datastore upload routes with ``../`` in the image id and in the label tag."""
    rows = []
    body, ctype = e2e.multipart({"params": "{}"}, {"file": ("angiogram.png", uploads_png)})
    for what, url in [
        ("PUT /datastore/image?image=../escape_image_id", f"{base}/datastore/image?image=../escape_image_id"),
        ("PUT /datastore/image (file name ../../escape_name.png)", None),
    ]:
        if url is None:
            body2, ctype2 = e2e.multipart({"params": "{}"}, {"file": ("../../escape_name.png", uploads_png)})
            url, b, c = f"{base}/datastore/image", body2, ctype2
        else:
            b, c = body, ctype
        try:
            status, _, data = e2e.http("PUT", url, b, {"Content-Type": c}, timeout=60)
        except urllib.error.HTTPError as e:
            status, data = e.code, e.read()
        rows.append({"request": what, "status": status, "answer": data[:200].decode(errors="replace")})
    lbody, lctype = e2e.multipart({"params": "{}"}, {"label": ("mask.png", uploads_png)})
    for what, url in [
        ("PUT /datastore/label?image=../escape_image_id&tag=final", f"{base}/datastore/label?image=../escape_image_id"),
        (f"PUT /datastore/label?image={image_id}&tag=../../escape_tag", None),
    ]:
        if url is None:
            url = f"{base}/datastore/label?image={image_id}&tag=../../escape_tag"
        try:
            status, _, data = e2e.http("PUT", url, lbody, {"Content-Type": lctype}, timeout=60)
        except urllib.error.HTTPError as e:
            status, data = e.code, e.read()
        rows.append({"request": what, "status": status, "answer": data[:200].decode(errors="replace")})
    return rows


# ----------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="scratch folder (studies, app copy, logs, server temp files)")
    p.add_argument("--bundle", default=str(REPO / "bundle"))
    p.add_argument(
        "--out", default="", help="write <out>.json and <out>.md (e.g. benchmarks/results/reliability_monailabel)"
    )
    p.add_argument("--size", type=int, default=64, help="synthetic image size (CPU speed)")
    p.add_argument("--images", type=int, default=8, help="unlabelled images the clients ask for")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=50, help="per client and phase")
    p.add_argument("--num-samples", type=int, default=1, help="num_samples of every request (CPU speed)")
    p.add_argument(
        "--server-threads",
        type=int,
        default=1,
        help="OMP_NUM_THREADS of the server and its training subprocess (0: leave unset). On a shared 2-core machine "
        "two OpenMP threads per process spin against each other and other jobs (see tests/conftest.py one_thread)",
    )
    p.add_argument(
        "--load-rounds",
        type=int,
        default=1,
        help="plain load phases in a row (server memory per round tells growth from warm-up)",
    )
    p.add_argument("--skip-train-phase", action="store_true")
    p.add_argument("--skip-hostile", action="store_true")
    p.add_argument(
        "--skip-inputs",
        default="",
        help="comma-separated hostile inputs to leave out (e.g. huge_8000x8000 against a bundle without ValidateImaged, "
        "which would try to segment 64 Mpx whole and exhaust the machine's memory)",
    )
    p.add_argument(
        "--max-wall", type=float, default=2400.0, help="overall deadline in seconds; requests left are skipped"
    )
    args = p.parse_args(argv)

    t_start = time.time()
    deadline = t_start + args.max_wall
    work = Path(args.workdir).resolve()
    srv = work / "srv"
    srv.mkdir(parents=True, exist_ok=True)
    # the server's temporary uploads and results go here (MONAI Label uses tempfile), so the tree check sees them
    tmp = srv / "tmp"
    if args.server_threads > 0:
        os.environ["OMP_NUM_THREADS"] = str(args.server_threads)
    models = {"vlmfilm_on": True, "vlmfilm_off": False, "vlmfilm_train": True}
    studies, labelled, unlabelled = e2e.make_studies(srv, args.size, n_train=4, n_test=args.images)
    app, ckpt_source = e2e.make_app(srv, models, Path(args.bundle).resolve())
    port = e2e.free_port()
    base = f"http://{HOST}:{port}"
    logfile = work / "server.log"
    params = {"device": "cpu", "num_samples": args.num_samples}
    summary: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"2-core CPU ({os.cpu_count()} CPUs visible), shared with other jobs; {platform.platform()}",
        "command": "E2E_SCRIPT=benchmarks/reliability_monailabel.py bash scripts/e2e_monailabel.sh  (or the venv's "
        "python benchmarks/reliability_monailabel.py --workdir W --out benchmarks/results/reliability_monailabel)",
        "args": vars(args),
        "server": {
            "monailabel": __import__("monailabel").__version__,
            "torch": __import__("torch").__version__,
            "monai": __import__("monai").__version__,
            "app": "monaibundle sample app from the monailabel wheel",
            "models": models,
            "weights": ckpt_source,
            "images": f"{args.images} synthetic {args.size}x{args.size} PNG angiograms",
            "request_params": params,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
        },
    }
    allowed = ("srv/studies/", "srv/apps/monaibundle/model/")
    app_log = "srv/apps/monaibundle/logs/"  # MONAI Label's own log of the app
    summary["load_average_start"] = [round(x, 2) for x in os.getloadavg()]
    before = tree(work)
    proc = e2e.start_server(app, studies, list(models), port, logfile, tmpdir=tmp)
    pgid = proc.pid
    ok = False
    try:
        info = e2e.wait_info(base, proc, logfile, 300)
        summary["server"]["start_s"] = round(time.time() - t_start, 1)
        log(f"server up: models {sorted(info.get('models', {}))}; processes {e2e.group_members(pgid)}")
        # 1. single-client reference answers (also warms up every model and variant)
        import numpy as np

        refs: dict[tuple[str, str], Any] = {}
        single: list[float] = []
        for image_id in unlabelled:
            for label, model, extra in VARIANTS:
                status, data, dt = post_infer(base, model, {**params, **extra}, image_id=image_id)
                if status != 200:
                    raise e2e.E2EError(f"reference {label} {image_id}: {status} {detail(data)}")
                refs[(label, image_id)] = decode_mask(data)
                single.append(dt)
        differ = sum(not np.array_equal(refs[("on", i)], refs[("off", i)]) for i in unlabelled)
        toggle = sum(np.array_equal(refs[("on+request_off", i)], refs[("off", i)]) for i in unlabelled)
        empty = sum(int((refs[(v, i)] > 0).sum() == 0) for v, _, _ in VARIANTS for i in unlabelled)
        summary["reference"] = {
            "images": len(unlabelled),
            "on_differs_from_off": differ,
            "request_off_equals_off_bundle": toggle,
            "empty_masks": empty,
            "vessel_pixels_mean": round(float(np.mean([(m > 0).sum() for m in refs.values()])), 1),
            # the first image's requests load each network: left out
            "single_client_latency_s": percentiles(single[len(VARIANTS) :]),
        }
        log(f"reference masks: {summary['reference']}")
        # 2. load, then load while /train runs
        phases = [("load" if r == 0 else f"load_round{r + 1}", False) for r in range(args.load_rounds)]
        phases += [] if args.skip_train_phase else [("load_during_train", True)]
        for name, during_train in phases:
            train_info: dict[str, Any] = {}
            if during_train:
                body = {"max_epochs": 10000, "val_split": 0.2, "multi_gpu": False, "device": "cpu", "tracking": "None"}
                _, _, data = e2e.http(
                    "POST",
                    f"{base}/train/vlmfilm_train",
                    json.dumps(body).encode(),
                    {"Content-Type": "application/json"},
                    timeout=60,
                )
                for _ in range(60):  # until the training subprocess runs
                    st = train_status(base)
                    if st.get("status") == "RUNNING":
                        break
                    time.sleep(1.0)
                train_info["status_at_start"] = st.get("status")
            log(f"phase {name}: {args.clients} clients x {args.requests} requests")
            res = load_phase(base, pgid, unlabelled, refs, params, args.clients, args.requests, deadline)
            if during_train:
                st = train_status(base)
                train_info["status_at_end"] = st.get("status")
                train_info["last_lines"] = (st.get("details") or [])[-3:]
                e2e.http("DELETE", f"{base}/train/", timeout=60)
                for _ in range(60):
                    st = train_status(base)
                    if st.get("status") not in ("RUNNING", "SUBMITTED"):
                        break
                    time.sleep(1.0)
                train_info["status_after_stop"] = st.get("status")
                res["train"] = train_info
            summary[name] = res
            log(
                f"phase {name}: failed {res['failed']}, wrong masks {res['wrong_masks']}, latency {res['latency_s']}, "
                f"RSS {res['rss_mb_before']} -> {res['rss_mb_after']} MB, train {train_info or '-'}"
            )
        # 3. hostile uploads
        if not args.skip_hostile:
            skip = tuple(x for x in args.skip_inputs.split(",") if x)
            hostile = hostile_phase(base, studies, unlabelled[0], refs, params, skip)
            hostile["datastore"] = datastore_phase(
                base, (studies / f"{unlabelled[0]}.png").read_bytes(), unlabelled[-1]
            )
            for r in hostile["datastore"]:
                log(f"datastore {r['request']}: {r['status']} {r['answer'][:120]}")
            summary["hostile"] = hostile
        summary["rss_mb_end"] = round(server_rss_mb(pgid), 1)
        ok = True
    finally:
        e2e.stop_server(proc)
        left = e2e.group_members(pgid, str(app))
        summary["processes_left"] = left
        after = tree(work)
        new = sorted(set(after) - set(before))
        outside = [f for f in new if not f.startswith(allowed + ("srv/tmp/",)) and f != "server.log"]
        temp_left = [f for f in new if f.startswith("srv/tmp/")]
        summary["files_written"] = {
            "inside_studies_or_model_folders": sum(1 for f in new if f.startswith(allowed)),
            "server_temp_left": temp_left,
            "server_temp_left_bytes": sum(after[f] for f in temp_left),
            "app_log": [f for f in outside if f.startswith(app_log)],
            "outside_by_datastore_probe": [f for f in outside if "escape" in f],
            "outside_other": [f for f in outside if not f.startswith(app_log) and "escape" not in f],
        }
        summary["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        summary["wall_s"] = round(time.time() - t_start, 1)
        log("summary " + json.dumps({k: v for k, v in summary.items() if not k.startswith("load")}))
    verdict = evaluate(summary) if ok else {"all_met": False, "why": ["run did not complete"]}
    summary["verdict"] = verdict
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
        out.with_suffix(".md").write_text(markdown(summary))
        log(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    log(f"verdict: {verdict}")
    return 0 if verdict["all_met"] else 1


def load_phases(s: dict[str, Any]) -> list[str]:
    return [k for k in s if k.startswith("load") and isinstance(s[k], dict) and "requests" in s[k]]


def evaluate(s: dict[str, Any]) -> dict[str, Any]:
    """Targets of issue 18 on our side (``why`` lists the misses) and what MONAI Label 0.8.5 itself does."""
    why, monailabel = [], []
    for name in load_phases(s):
        r = s[name]
        if r["failed"] or r["wrong_masks"] or r["skipped_after_deadline"]:
            why.append(
                f"{name}: {r['failed']} failed, {r['wrong_masks']} wrong masks, {r['skipped_after_deadline']} skipped"
            )
    t = s.get("load_during_train", {}).get("train", {})
    if t and t.get("status_at_end") != "RUNNING":
        why.append(f"training was not running through the whole phase (at end: {t.get('status_at_end')})")
    rows = s.get("hostile", {}).get("infer_uploads", [])
    for r in rows:
        if not r["pass"]:
            why.append(f"hostile {r['model']} {r['input']}: {r['status']} {r.get('answer', '')[:120]}")
    fw = s.get("files_written", {})
    if fw.get("outside_other"):
        why.append(f"written outside studies / model folders: {fw['outside_other']}")
    if s.get("processes_left"):
        why.append(f"processes left: {s['processes_left']}")
    refused = sum(1 for r in rows if r["status"] != 200 and r["input"] not in ("image_id_dotdot", "image_id_abs_path"))
    if fw.get("server_temp_left"):
        monailabel.append(
            f"{len(fw['server_temp_left'])} files ({fw['server_temp_left_bytes']} bytes) left in the server's TMPDIR "
            f"after {refused} refused uploads: /infer removes an upload in a FastAPI background task, which runs "
            "only after a successful response"
        )
    if fw.get("outside_by_datastore_probe"):
        monailabel.append(
            f"datastore routes wrote outside the studies folder: {fw['outside_by_datastore_probe']} (LocalDatastore "
            "joins the image id and the label tag from the request into paths unchecked)"
        )
    return {"all_met": not why, "why": why, "monailabel_findings": monailabel}


def markdown(s: dict[str, Any]) -> str:
    lines = [
        "# MONAI Label under load and hostile uploads",
        "",
        f"{s['date']}; {s['machine']}.",
        f"Command: `{s['command']}`.",
        f"Server: monailabel {s['server']['monailabel']}, MONAI {s['server']['monai']}, torch {s['server']['torch']} "
        f"(CPU); {s['server']['app']}; models {s['server']['models']}; weights: {s['server']['weights']}; "
        f"{s['server']['images']}; request params {s['server']['request_params']}; OMP_NUM_THREADS "
        f"{s['server'].get('OMP_NUM_THREADS')}.",
        "",
    ]
    ref = s.get("reference")
    if ref:
        lines += [
            f"Reference (one client): {ref['images']} images x 3 variants; FiLM on differs from off on "
            f"{ref['on_differs_from_off']}/{ref['images']} images; request `use_vlm_film: false` equals the off bundle on "
            f"{ref['request_off_equals_off_bundle']}/{ref['images']}; {ref['empty_masks']} empty masks; "
            f"{ref['vessel_pixels_mean']} vessel pixels per mask on average; one client alone (warm): latency "
            f"{ref.get('single_client_latency_s')} s.",
            "",
            "| phase | requests | failed | wrong masks | p50 s | p95 s | p99 s | max s | throughput req/s | server RSS before -> after MB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
    for name in load_phases(s):
        r = s[name]
        lat = r["latency_s"]
        lines.append(
            f"| {name} | {r['sent']} | {r['failed']} | {r['wrong_masks']} | {lat.get('p50')} | {lat.get('p95')} | "
            f"{lat.get('p99')} | {lat.get('max')} | {r['throughput_rps']} | {r['rss_mb_before']} -> {r['rss_mb_after']} |"
        )
    t = s.get("load_during_train", {}).get("train")
    if t:
        lines += [
            "",
            f"Training (`/train/vlmfilm_train`): status at start {t.get('status_at_start')}, at end "
            f"{t.get('status_at_end')}, after `DELETE /train/` {t.get('status_after_stop')}.",
        ]
    h = s.get("hostile")
    if h:
        lines += [
            "",
            "| model | upload | HTTP | answer / mask | next request OK | pass |",
            "|---|---|---:|---|---|---|",
        ]
        for r in h["infer_uploads"]:
            if r["status"] == 200:
                ans = f"mask {r.get('mask_shape')}, equals the 8-bit reference: {r.get('mask_equals_8bit_reference')}"
            else:
                ans = r.get("answer", "").replace("|", "\\|")[:220]
            lines.append(
                f"| {r['model']} | {r['input']} | {r['status']} | {ans} | {r['next_request_ok']} | {r['pass']} |"
            )
        lines += ["", "| datastore request (MONAI Label's own code) | HTTP | answer |", "|---|---:|---|"]
        for r in h.get("datastore", []):
            lines.append(f"| {r['request']} | {r['status']} | {r['answer'][:160].replace('|', '/')} |")
    fw = s.get("files_written", {})
    lines += [
        "",
        f"Files written in the work folder during the run: {fw.get('inside_studies_or_model_folders')} inside studies / "
        f"model folders; MONAI Label's app log {fw.get('app_log')}; left in the server's TMPDIR: "
        f"{len(fw.get('server_temp_left', []))} files, {fw.get('server_temp_left_bytes')} bytes; written outside by the "
        f"datastore probes: {fw.get('outside_by_datastore_probe')}; anything else outside: {fw.get('outside_other')}.",
        f"Processes left after stop: {s.get('processes_left')}. Wall time {s.get('wall_s')} s.",
        "",
        f"Load average (1, 5, 15 min) at start {s.get('load_average_start')}, at end {s.get('load_average_end')}.",
        "",
        f"Verdict (our side): {'all targets met' if s['verdict']['all_met'] else 'NOT met: ' + '; '.join(s['verdict']['why'])}",
        "",
        "MONAI Label 0.8.5 itself: " + ("; ".join(s["verdict"].get("monailabel_findings", [])) or "nothing found"),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except e2e.E2EError as e:
        print(f"[ml-rel] FAILED: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
