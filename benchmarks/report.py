"""Presenting results: the per-case table, the summary, the JSON document and the Markdown section.

A results document (the JSON file) is {"schema", "env", "config", "copy_bandwidth", "records"};
each record is one (case, provider) with its raw samples and statistics, η, memory, the --check
outcome and the error if it could not run. Everything here reads only documents, so --report
works on committed files without fusedbn or a GPU.

η is never shown above 1: a kernel cannot move its minimal bytes faster than a copy does, so such
a value says the copy bandwidth was under-measured (or the data stayed in cache), not that the
kernel is that good. The sweep flags those records (eta None, eta_above_1 the value) and the
tables show the flag instead; documents written before the rule are read the same way.
"""
import glob
import json
import math
import os
from collections import OrderedDict

from .cases import DTYPES, LAYOUTS, MODES, normalize_layout
from .environment import describe
from .providers import REFERENCE

SCHEMA = 1


def write_json(doc, path):
    """Writes the document atomically (a .tmp file renamed into place)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def load_documents(pattern):
    """The results documents of this suite matching a glob pattern, sorted by file name (other
    benchmarks' JSON files in the same folder, such as act_cpu.json and traffic.json, are
    skipped)."""
    docs = []
    for path in sorted(glob.glob(pattern)):
        with open(path) as f:
            doc = json.load(f)
        if (not isinstance(doc, dict) or "records" not in doc
                or "device_slug" not in (doc.get("env") or {})):
            continue  # another benchmark's file (act_cpu.json, traffic.json)
        doc["path"] = path
        docs.append(doc)
    return docs


def providers_of(doc):
    return list(doc["config"]["providers"])


def baselines_of(doc):
    return [p for p in providers_of(doc) if p != REFERENCE]


def by_case(records):
    """OrderedDict (set, shape, dtype, layout, mode) -> {provider: record}, in sweep order."""
    out = OrderedDict()
    for r in records:
        out.setdefault(case_key(r), {})[r["provider"]] = r
    return out


def case_key(r):
    """(set, shape, dtype, layout label, mode) of a record (old files' layouts normalized)."""
    shape = tuple(r["shape"])
    return (r["set"], shape, r["dtype"], normalize_layout(shape, r["layout"]), r["mode"])


ETA_FLAG = "‡"


def eta(rec):
    """η of a record, or None where it was not measured or came out above 1 (see the module
    docstring; eta_flagged tells the two apart)."""
    v = (rec or {}).get("eta")
    return v if v is not None and v <= 1.0 else None


def eta_flagged(rec):
    """Whether the record's η came out above 1 (and is therefore not reported)."""
    rec = rec or {}
    return rec.get("eta_above_1") is not None or (rec.get("eta") or 0) > 1.0


def _eta_cell(rec):
    return ETA_FLAG if eta_flagged(rec) else _num(eta(rec), "%.2f")


def median(rec):
    return rec["stats"]["median_s"] if rec and rec.get("stats") else None


def speedup(recs, other):
    """t(other) / t(fusedbn) for one case, or None when either did not run."""
    t_ref, t_other = median(recs.get(REFERENCE)), median(recs.get(other))
    return t_other / t_ref if t_ref and t_other else None


def geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def _num(v, fmt):
    return "-" if v is None else fmt % v


def _milliseconds(rec):
    if rec is None:
        return "-"
    if rec.get("error"):
        return "err"
    return _num(median(rec) * 1e3, "%.4g")


# The counted traffic of fusedbn's CUDA kernels (python -m benchmarks.traffic --commit-results):
# the benchmark's modes as the ops counted there.
TRAFFIC_DOC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "traffic.json")
_TRAFFIC_OPS = {"fwd": ("fwd",), "infer": ("infer",), "bwd": ("bwd",), "fwdbwd": ("fwd", "bwd")}


def load_traffic(path=TRAFFIC_DOC):
    """The counted-traffic document, or None where there is none."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        doc = json.load(f)
    doc["by_case"] = {(tuple(r["shape"]), r["dtype"], r["layout"], r["op"]): r
                      for r in doc["records"]}
    return doc


def counted(traffic, shape, dtype, layout, mode):
    """fusedbn's counted bytes over the bulk tensors per |x| for a case (summed over the ops of
    fwdbwd), or None where the document does not have it."""
    if traffic is None:
        return None
    recs = [traffic["by_case"].get((tuple(shape), dtype, layout, op))
            for op in _TRAFFIC_OPS.get(mode, ())]
    if not recs or any(r is None for r in recs):
        return None
    return sum(r["bulk_x"] for r in recs)


def shows_traffic(doc, traffic):
    """Whether the case table has the counted-traffic column: CUDA documents, when the counts
    exist."""
    return traffic is not None and doc["env"].get("device", "cpu") != "cpu"


def case_table(doc, traffic=None):
    """(headers, rows) of the per-case table; with `traffic` (load_traffic) and a CUDA document,
    a column of fusedbn's counted traffic beside its time and η."""
    provs, bases = providers_of(doc), baselines_of(doc)
    with_traffic = shows_traffic(doc, traffic)
    headers = (["mode", "dtype", "layout", "shape"] + ["%s ms" % p for p in provs]
               + ["×%s" % b for b in bases] + ["η %s" % p for p in provs]
               + (["counted |x|"] if with_traffic else []))
    rows = []
    for (_, shape, dtype, layout, mode), recs in by_case(doc["records"]).items():
        times = [_milliseconds(recs.get(p)) for p in provs]
        ratios = [_num(speedup(recs, b), "%.2f") for b in bases]
        etas = [_eta_cell(recs.get(p)) for p in provs]
        mark = "†" if any(contended(r) for r in recs.values()) else ""
        extra = ([_num(counted(traffic, shape, dtype, layout, mode), "%.2f")]
                 if with_traffic else [])
        rows.append([mode, dtype, layout, "x".join(map(str, shape)) + mark]
                    + times + ratios + etas + extra)
    return headers, rows


def traffic_note(doc, traffic):
    """What the counted-traffic column is, where the table has one."""
    if not shows_traffic(doc, traffic):
        return ""
    commit = ((traffic["env"].get("git") or {}).get("commit") or "unknown")[:10]
    return (" counted |x|: the bytes fusedbn's CUDA kernels move over the bulk tensors (x, y, "
            "dy, dx, masks of at least |x|/2) per |x|, counted by the CUDA emulation at the "
            "case's shape with N*spatial scaled down (python -m benchmarks.traffic "
            "--commit-results, benchmarks/results/traffic.json, commit %s); the floor is 2 "
            "(fwd, infer), 3 (bwd), 5 (fwdbwd)." % commit)


def summary(doc):
    """Per (mode, dtype, layout): geometric mean and minimum of the speed-up of fusedbn over each
    baseline, and the geometric mean of η per provider; plus an 'all' group."""
    groups = OrderedDict()
    for key, recs in by_case(doc["records"]).items():
        _, _, dtype, layout, mode = key
        for g in ((mode, dtype, layout), ("all", "", "")):
            groups.setdefault(g, []).append((key, recs))
    order = {m: i for i, m in enumerate(MODES + ("all",))}
    dorder = {d: i for i, d in enumerate([""] + list(DTYPES))}
    lorder = {l: i for i, l in enumerate(("",) + LAYOUTS)}
    out = []
    for g in sorted(groups, key=lambda g: (order[g[0]], dorder.get(g[1], 99),
                                           lorder.get(g[2], 99))):
        entry = {"mode": g[0], "dtype": g[1], "layout": g[2], "cases": len(groups[g])}
        for b in baselines_of(doc):
            pairs = [(speedup(r, b), k) for k, r in groups[g] if speedup(r, b)]
            entry["geomean_vs_" + b] = geomean([s for s, _ in pairs])
            low = min(pairs) if pairs else (None, None)
            entry["min_vs_" + b] = low[0]
            entry["min_case_vs_" + b] = None if low[1] is None else " ".join(
                ["x".join(map(str, low[1][1]))] + list(low[1][2:]))
        for p in providers_of(doc):
            entry["eta_" + p] = geomean([eta(r.get(p)) for _, r in groups[g]
                                         if eta(r.get(p))])
        out.append(entry)
    return out


def summary_table(doc):
    """(headers, rows) of the summary."""
    bases, provs = baselines_of(doc), providers_of(doc)
    headers = (["mode", "dtype", "layout", "cases"]
               + [h % b for b in bases for h in ("geomean ×%s", "min ×%s")]
               + ["η %s" % p for p in provs])
    rows = []
    for e in summary(doc):
        rows.append([e["mode"], e["dtype"], e["layout"], str(e["cases"])]
                    + [_num(e[k % b], "%.2f") for b in bases for k in ("geomean_vs_%s",
                                                                       "min_vs_%s")]
                    + [_num(e["eta_" + p], "%.2f") for p in provs])
    return headers, rows


def format_table(headers, rows, markdown=False):
    """A plain-text (aligned) or Markdown table."""
    if markdown:
        lines = ["| " + " | ".join(headers) + " |",
                 "|" + "|".join("---" if i < 3 else "---:" for i in range(len(headers))) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    fmt = "  ".join("%%-%ds" % w if i < 4 else "%%%ds" % w for i, w in enumerate(widths))
    return "\n".join([fmt % tuple(headers)] + [fmt % tuple(r) for r in rows])


def errors(doc):
    """Distinct errors per provider, with the number of cases each occurred in."""
    seen = OrderedDict()
    for r in doc["records"]:
        if r.get("error"):
            key = (r["provider"], r["error"])
            seen[key] = seen.get(key, 0) + 1
    return ["%s (%d cases): %s" % (p, n, e) for (p, e), n in seen.items()]


def contended(rec):
    """Whether the record's case kept timing rounds that shared the CPU with other jobs."""
    return bool((rec.get("contention") or {}).get("contended_rounds_kept"))


def contention_note(doc):
    """Warnings: the machine was busy during the sweep; some cases kept timing rounds that shared
    the CPU with other jobs; some η came out above 1 (not reported)."""
    out = []
    load = (doc.get("config") or {}).get("others_cores_during_sweep")
    threshold = (doc.get("config") or {}).get("load_threshold") or 0.25
    if load is not None and load > threshold:
        out.append("warning: the machine was contended: other processes used %.1f cores on "
                   "average during the sweep; times, speed-ups and η are less reliable (re-run "
                   "on a quiet machine to compare)" % load)
    cases = {case_key(r) for r in doc["records"] if contended(r)}
    if cases:
        out.append("%d of %d cases (marked †) kept timing rounds during which other processes "
                   "used the CPU (contention in the JSON); their times are less reliable"
                   % (len(cases), len(by_case(doc["records"]))))
    flagged = [r for r in doc["records"] if eta_flagged(r)]
    if flagged:
        out.append("%d records (η shown as %s) came out above η = 1, faster than the copy "
                   "bandwidth allows: the bandwidth was under-measured or their data stayed in "
                   "cache; their η is not reported" % (len(flagged), ETA_FLAG))
    return out


def headline(doc):
    """The minimum speed-up over each baseline, in words."""
    all_row = [e for e in summary(doc) if e["mode"] == "all"]
    out = []
    for b in baselines_of(doc):
        e = all_row[0] if all_row else {}
        if e.get("min_vs_" + b) is not None:
            out.append("fusedbn vs %s: geometric mean %.2f×, minimum %.2f× (%s)"
                       % (b, e["geomean_vs_" + b], e["min_vs_" + b], e["min_case_vs_" + b]))
    return out


def method_note(doc):
    cfg, bw = doc["config"], doc["copy_bandwidth"]
    return ("Times are medians over interleaved repeats after warm-up, caches flushed between "
            "calls; ×P is t(P) / t(fusedbn) (above 1: fusedbn is faster); η = minimal bytes / "
            "(time × copy bandwidth), minimal bytes = 2|x| (fwd, infer), 3|x| (bwd), 5|x| "
            "(fwdbwd); copy bandwidth measured in the same run: %.1f GB/s%s. Parameters are "
            "float32 (as under AMP). Modes: %s.%s" % (
                bw["bytes_per_s"] / 1e9, _bandwidth_how(bw), ", ".join(cfg["modes"]),
                _allocator_note(cfg)))


def _bandwidth_how(bw):
    """How the copy bandwidth was found (results files older than the per-case copies say
    nothing)."""
    if not bw.get("probe_samples"):
        return ""
    return (" (the best of %d copies, timed before the sweep and beside the cases in their "
            "timing rounds)" % (bw["probe_samples"] + bw["stats"]["n"]))


def _allocator_note(cfg):
    """How CPU memory was allocated (benchmarks/timing.py, --allocator); results files older
    than the option say nothing."""
    alloc = cfg.get("allocator")
    if not alloc or alloc == "default":
        return ""
    return (" Memory: %s (freed memory is kept, so page faults of fresh outputs are not timed; "
            "the same for every provider)." % alloc)


def print_report(doc, file, traffic=None):
    """The per-case table, the summary and any errors, as plain text (with `traffic`: the
    counted-traffic column of CUDA documents)."""
    print("\n" + describe(doc["env"]), file=file)
    print(method_note(doc) + traffic_note(doc, traffic) + "\n", file=file)
    print(format_table(*case_table(doc, traffic)), file=file)
    print("\nSummary (geometric means per mode, dtype, layout):\n", file=file)
    print(format_table(*summary_table(doc)), file=file)
    for line in headline(doc) + contention_note(doc):
        print(line, file=file)
    for line in errors(doc):
        print("error: " + line, file=file)


def markdown(docs, traffic=None):
    """The README's performance section, generated from results documents (with `traffic`: the
    counted-traffic column of CUDA documents)."""
    out = ["## Performance", "",
           "Generated by `python -m benchmarks --report` from `benchmarks/results/*.json`; "
           "reproduce a file with the command recorded in it.", ""]
    for doc in docs:
        env = doc["env"]
        slug = env["device_slug"]
        title = "CPU" if slug == "cpu" else slug.upper()
        out += ["### %s (`%s`)" % (title, doc["path"]), "", describe(env) + ".", "",
                method_note(doc) + traffic_note(doc, traffic), "",
                "Command: `%s`" % doc["config"].get("command", "?"), ""]
        out += ["- " + line for line in headline(doc) + contention_note(doc)] + [""]
        out += [format_table(*summary_table(doc), markdown=True), ""]
        png = os.path.splitext(doc["path"])[0] + ".png"
        if os.path.exists(png):
            out += ["![fusedbn speed-up and efficiency on %s](%s)" % (env["device_slug"], png), ""]
        out += ["<details><summary>All cases</summary>", "",
                format_table(*case_table(doc, traffic), markdown=True), "", "</details>", ""]
        out += ["- error: " + line for line in errors(doc)]
    return "\n".join(out).rstrip() + "\n"
