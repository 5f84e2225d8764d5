"""Kernel and model regression check: a new results folder against committed results of the same card.

    python -m benchmarks.compare NEW_DIR                        # baseline: --baseline auto
    python -m benchmarks.compare NEW_DIR --baseline benchmarks/results/gpu-h200-2026-11-26-run2
    python -m benchmarks.compare NEW_DIR --threshold 0.05 --warn-only

NEW_DIR holds what benchmarks/harness.py's Recorder wrote (``<bench>.json``: {"name", "machine",
"context", "rows"}; ``fastbert bench --json`` writes the same), e.g. the folder
benchmarks/gpu_check.sh fills; a bare JSON list of rows works too where its rows name a GPU as their
device. Rows are joined on their identifying fields: every field that is not a measurement
(measurements: ``*_ms``, ``*_per_s``, TFLOP/s, GB/s, memory, MFU, ratios, every float but a few
settings such as dropout; see MEASUREMENT, FLOAT_SETTINGS and ``--ignore-field``), so a row is
"bench_attention: op=attention impl=fastbert seq=512 dtype=bf16 pass=fwd+bwd ..." on both sides. The
compared figure is ``median_ms`` (the median of repeated measurements: do_bench's on a GPU, the
median over timed steps for the model step), or for a row that reports only ``real_tokens_per_s``
(benchmarks.pretrain_loop) its inverse, ms per 1000 real tokens; a row whose new figure is more than
``--threshold`` (default 10%) above the old one is flagged. Where both sides also carry ``graph_ms``
(the kernel benchmarks' device time from CUDA-graph replays, harness.measure_graphed) that is
compared too, as its own line marked "[graph]": a kernel that got slower shows there even when a
host-bound median hides it.

Cards: a timing is only comparable on the same card. The card of a file is its ``machine.gpu``
(else the rows' ``device``, else the folder's env.txt; on the CPU the CPU model and core count).
A different or unknown card is refused (exit 2) with the two names.

``--baseline auto`` (default): for each benchmark of NEW_DIR, the newest committed file of the same
name and card under benchmarks/results/ that ran before it and shares at least one row with it
(newest by the date recorded in it; "committed" = tracked by git when the checkout has a .git, otherwise every file
there), and for each new row that file lacks, the newest older run that has it. So a folder that
re-ran only the attention benchmark does not hide the model-step results of an older run, and a
newer run of other shapes (or of some of these) does not hide the one that ran these.

Rows written before an identifying field existed take its value then (FIELD_DEFAULTS: a model-step row
without ``malloc`` ran on glibc's default allocator), so adding a column does not unjoin every row.

Exit status: 0 no regression; 1 at least one row flagged slower, or failed (an error, or ``ok`` false)
in the new run (0 with --warn-only; missing rows and benchmarks count only with --fail-on-missing);
2 nothing to compare (different card, no baseline, no rows, or a benchmark
whose rows match none of its baseline's: a check that compared nothing never passes).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Fields that are measurements (or derived from them), never part of a row's identity.
MEASUREMENT = re.compile(
    r"(_ms|_s|_per_s|tflops|gbps|_gib|_mib|_gb|_mb|mfu|frac_of_ceiling|_ratio|_err|_error)$"
    r"|^(speedup|vs_|graph_|mem_ratio|peak|ratio|cos)"
    r"|^(device|label|error|repeats|n_steps|steps|stopped_by|notes?|weights|ok|best_epoch)$")
# Float fields are measurements too, except these settings (attention benchmark's fill and dropout).
FLOAT_SETTINGS = {"fill", "dropout", "dropout_p", "p", "mask_prob", "lr", "threshold"}
METRIC = "median_ms"
# Identifying fields added after some baselines were written, with the value those older rows had.
FIELD_DEFAULTS = {"malloc": "glibc-default"}


class CompareError(Exception):
    """Nothing can be compared (different card, no baseline, unreadable file); exit status 2."""


# ------------------------------------------------------------------------------------------ loading

def _card_from_env_txt(folder: Path) -> str | None:
    env = folder / "env.txt"
    if not env.is_file():
        return None
    m = re.search(r"(NVIDIA [^,\n]+?)\s*(,|\n|$)", env.read_text(errors="replace"))
    return m.group(1).strip() if m else None


def card_of(payload: dict, rows: list[dict], folder: Path) -> str | None:
    machine = payload.get("machine") or {}
    if machine.get("gpu"):
        return str(machine["gpu"]).strip()
    devices = {str(r["device"]).strip() for r in rows if r.get("device")}
    gpus = {d for d in devices if d.lower() != "cpu"}
    if len(gpus) == 1:
        return gpus.pop()
    if gpus:
        raise CompareError(f"rows name several devices: {sorted(gpus)}")
    env = _card_from_env_txt(folder)
    if env:
        return env
    if machine.get("cpu_model") or machine.get("cpu"):  # bare CPU rows name no model: unknown
        model = machine.get("cpu_model") or machine.get("cpu") or "unknown model"
        cores = machine.get("cpu_count")
        return f"CPU {model}" + (f" ({cores} cores)" if cores else "")
    return None


def load_file(path: Path) -> dict | None:
    """{"name", "card", "date", "rows", "path"} of one results file, or None if it holds no rows."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CompareError(f"{path}: not readable JSON ({e})") from None
    if isinstance(data, list):
        payload, rows = {}, data
    elif isinstance(data, dict) and isinstance(data.get("rows"), list):
        payload, rows = data, data["rows"]
    else:
        return None
    rows = [r for r in rows if isinstance(r, dict)]
    if not rows:
        return None
    return {"name": payload.get("name") or path.stem, "card": card_of(payload, rows, path.parent),
            "date": (payload.get("machine") or {}).get("date") or "", "rows": rows, "path": path}


def load_folder(folder: Path) -> dict[str, dict]:
    if not folder.is_dir():
        raise CompareError(f"{folder} is not a folder")
    out = {}
    for path in sorted(folder.glob("*.json")):
        f = load_file(path)
        if f is not None:
            out[f["name"]] = f
    return out


def _committed(root: Path) -> set[Path] | None:
    """Result files tracked by git under root, or None where there is no git checkout."""
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True,
                             text=True, timeout=10)
        if top.returncode:
            return None
        res = subprocess.run(["git", "ls-files", "-z", "--", "."], cwd=root, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode:
        return None
    return {(root / p).resolve() for p in res.stdout.split("\0") if p}


def auto_baseline(new: dict[str, dict], new_dir: Path, root: Path, ignore: set[str] = frozenset()) -> dict[str, dict]:
    """For each benchmark of `new`, the newest committed file of the same name and card under root that
    shares at least one row with it (else the newest of that name and card, which compare() then reports
    as matching nothing): a newer run of other shapes must not stand in for the one that ran these."""
    committed = _committed(root)
    if committed is None:
        print(f"note: no git checkout at {root}; every result file there counts as committed", file=sys.stderr)
    new_dir = new_dir.resolve()
    candidates: dict[str, list[dict]] = {}
    for path in sorted(root.rglob("*.json")):
        rp = path.resolve()
        if new_dir in rp.parents or (committed is not None and rp not in committed):
            continue
        try:
            f = load_file(path)
        except CompareError:
            continue
        if f is not None and f["name"] in new:
            candidates.setdefault(f["name"], []).append(f)
    chosen = {}
    for name, f_new in new.items():
        same = [f for f in candidates.get(name, []) if f["card"] and f["card"] == f_new["card"]
                and not (f["date"] and f_new["date"] and f["date"] >= f_new["date"])]  # only runs before it
        if not same:
            continue
        def good_rows(f):  # a file's rows that did not fail, by identity
            return keyed_rows([r for r in f["rows"] if not is_error(r)], ignore)
        new_keys = set(good_rows(f_new))
        newest_first = sorted(same, key=lambda f: (f["date"], f["path"].stat().st_mtime), reverse=True)
        rows_of = [(f, good_rows(f)) for f in newest_first]
        sharing = [(f, rows) for f, rows in rows_of if new_keys & rows.keys()]
        if not sharing:
            chosen[name] = newest_first[0]
            continue
        # the newest sharing run, and for each new row it lacks the newest older run that has it: a newer
        # run of some of the rows must not hide the older run of the others (they would go uncompared)
        # (a failed row of the newest run must not take the identity of an older run's good row)
        (primary, merged), also = sharing[0], []
        merged = dict(merged)
        for f, rows in sharing[1:]:
            extra = {k: r for k, r in rows.items() if k in new_keys and k not in merged}
            if extra:
                merged.update(extra)
                also.append(f["path"])
        chosen[name] = dict(primary, rows=list(merged.values()), also=also)
    return chosen


# ------------------------------------------------------------------------------------------ joining

def is_identifying(key: str, value) -> bool:
    if MEASUREMENT.search(key) or key == METRIC:
        return False
    return not isinstance(value, float) or key in FLOAT_SETTINGS


def identity(row: dict, ignore: set[str]) -> tuple:
    row = {**FIELD_DEFAULTS, **row}  # a field missing from one side's rows must not split every identity
    return tuple(sorted((k, repr(v)) for k, v in row.items() if k not in ignore and is_identifying(k, v)))


def keyed_rows(rows: list[dict], ignore: set[str]) -> dict[tuple, dict]:
    """Rows by identity; a repeated identity gets an occurrence number so nothing is dropped silently."""
    out, seen = {}, {}
    for r in rows:
        key = identity(r, ignore)
        n = seen.get(key, 0)
        seen[key] = n + 1
        out[key + ((("#", str(n + 1)),) if n else ())] = r
    return out


def is_error(row: dict) -> bool:
    """A row that failed: an error row, or one whose own check of its result said wrong (ok false)."""
    return row.get("impl") == "ERROR" or bool(row.get("error")) or row.get("ok") is False


def describe(key: tuple, varying: set[str]) -> str:
    parts = [f"{k}={v.strip(chr(39))}" for k, v in key if k in varying or k == "#"]
    return " ".join(parts) or "(single row)"


def time_figure(row: dict) -> tuple[float | None, str]:
    """(a row's time figure, lower is better; a note on its unit): median_ms, or for a row that reports
    only a throughput (pretrain_loop's real_tokens_per_s) milliseconds per 1000 real tokens."""
    if isinstance(row.get(METRIC), (int, float)):
        return float(row[METRIC]), ""
    tps = row.get("real_tokens_per_s")
    if isinstance(tps, (int, float)) and tps > 0:
        return 1e6 / tps, " (ms per 1k real tokens)"
    return None, ""


def compare_file(name: str, old: dict, new: dict, threshold: float, ignore: set[str]) -> dict:
    if not old["card"] or not new["card"]:
        raise CompareError(f"{name}: the card of {old['path'] if not old['card'] else new['path']} is unknown; "
                           f"timings are only compared on the same card")
    if old["card"] != new["card"]:
        raise CompareError(f"{name}: refusing to compare across cards: baseline {old['path']} ran on "
                           f"{old['card']!r}, new {new['path']} on {new['card']!r}")
    old_rows = keyed_rows([r for r in old["rows"] if not is_error(r)], ignore)
    new_all = keyed_rows(new["rows"], ignore)
    errors = [describe(k, {f for f, _ in k}) for k, r in new_all.items() if is_error(r)]
    new_rows = {k: r for k, r in new_all.items() if not is_error(r)}
    keys = list(old_rows) + [k for k in new_rows if k not in old_rows]
    varying = {f for f in {f for k in keys for f, _ in k}
               if len({dict(k).get(f) for k in keys}) > 1}
    lines, flagged, missing, added, no_figure, joined = [], [], [], [], [], 0
    for k in keys:
        o, n = old_rows.get(k), new_rows.get(k)
        label = describe(k, varying)
        if n is None:
            missing.append(label)
            continue
        if o is None:
            added.append(label)
            continue
        joined += 1
        (old_ms, unit), (new_ms, _) = time_figure(o), time_figure(n)
        if old_ms is not None and new_ms is None:
            no_figure.append(label)
        figures = [(label + unit, old_ms, new_ms, "", "median")]
        if all(isinstance(r.get("graph_ms"), (int, float)) for r in (o, n)):
            figures.append((label + " [graph]", float(o["graph_ms"]), float(n["graph_ms"]), "graph_", "graph"))
        for row_label, old_v, new_v, prefix, figure in figures:
            if old_v is None or new_v is None:
                continue
            ratio = new_v / old_v if old_v > 0 else float("inf")
            flag = "SLOWER" if ratio > 1 + threshold else ("faster" if ratio < 1 / (1 + threshold) else "")
            note = ""
            new_p20, old_p80 = n.get(prefix + "p20_ms"), o.get(prefix + "p80_ms")
            if flag == "SLOWER" and isinstance(new_p20, (int, float)) and isinstance(old_p80, (int, float)) \
                    and new_p20 <= old_p80:
                note = "new p20 <= old p80 (noisy)"
            lines.append({"bench": name, "row": row_label, "figure": figure, "old_ms": old_v, "new_ms": new_v,
                          "ratio": ratio, "flag": flag, "note": note})
            if flag == "SLOWER":
                flagged.append(lines[-1])
    return {"lines": lines, "flagged": flagged, "missing": missing, "added": added, "errors": errors,
            "no_figure": no_figure, "joined": joined}


def compare(new_dir: Path, baseline: str = "auto", threshold: float = 0.10, root: Path = RESULTS_DIR,
            ignore: set[str] = frozenset()) -> dict:
    new = load_folder(new_dir)
    if not new:
        raise CompareError(f"{new_dir}: no result files (JSON with rows) found")
    cards = {f["card"] for f in new.values()}
    if None in cards:
        unknown = [str(f["path"]) for f in new.values() if f["card"] is None]
        raise CompareError(f"cannot tell which card produced {', '.join(unknown)} (no machine.gpu or "
                           f"machine.cpu_model, no GPU named by its rows' device, no env.txt naming one; "
                           f"\"cpu\" alone does not say which CPU); timings are only compared on the same card")
    if baseline == "auto":
        old = auto_baseline(new, new_dir, root, set(ignore))
        if not old:
            raise CompareError(f"no committed results under {root} for card {', '.join(sorted(cards))} and "
                               f"benchmarks {', '.join(sorted(new))}")
    else:
        old = load_folder(Path(baseline))
        if not old:
            raise CompareError(f"{baseline}: no result files (JSON with rows) found")
    report = {"files": [], "lines": [], "flagged": [], "missing": [], "added": [], "errors": [], "unmatched": [],
              "no_figure": [],
              "no_baseline": [n for n in new if n not in old], "not_rerun": [n for n in old if n not in new]}
    for name in sorted(set(new) & set(old)):
        r = compare_file(name, old[name], new[name], threshold, set(ignore))
        source = str(old[name]["path"]) + "".join(f" + rows of {p}" for p in old[name].get("also", []))
        report["files"].append((name, source, str(new[name]["path"]), new[name]["card"]))
        if not r["joined"]:  # no row joined (or every new row failed): the check compared nothing
            failed = f" ({len(r['errors'])} more failed)" if r["errors"] else ""
            why = _differing_fields(old[name], new[name], set(ignore)) if r["added"] else ""
            report["unmatched"].append(f"{name}: none of its {len(r['added'])} rows{failed} matches one of "
                                       f"the baseline's {len(r['missing'])}{why}")
        for k in ("lines", "flagged"):
            report[k] += r[k]
        for k in ("missing", "added", "errors", "no_figure"):
            report[k] += [f"{name}: {x}" for x in r[k]]
    if not report["files"]:
        old_cards = {f["card"] for f in old.values()}
        if old_cards and not (old_cards & cards):
            raise CompareError(f"refusing to compare across cards: the baseline ran on "
                               f"{', '.join(sorted(map(str, old_cards)))}, the new results on {', '.join(sorted(cards))}")
        raise CompareError(f"no benchmark of {new_dir} ({', '.join(sorted(new))}) is in the baseline "
                           f"({', '.join(sorted(old))})")
    return report


def _differing_fields(old: dict, new: dict, ignore: set[str]) -> str:
    """Why two runs' rows do not join: '; fields on one side only: ...', else '; no value in common:
    ...' (identifying fields as the join sees them: defaults applied, ignored fields left out)."""
    def values(f):
        out: dict[str, set] = {}
        for r in f["rows"]:
            if not is_error(r):
                for k, v in identity(r, ignore):
                    out.setdefault(k, set()).add(v)
        return out
    a, b = values(old), values(new)
    if not a:
        return "; the baseline's rows all failed"
    only = sorted(set(a) ^ set(b))
    if only:
        return f"; fields on one side only: {', '.join(only)}"
    apart = sorted(k for k in a if not a[k] & b[k])
    return f"; no value in common: {', '.join(apart)}" if apart else ""


# ------------------------------------------------------------------------------------------ output

def format_report(report: dict, threshold: float) -> str:
    out = []
    for name, old, new, card in report["files"]:
        out.append(f"{name}: {old} -> {new} ({card})")
    rows = report["lines"]
    if rows:
        w = max(len(f"{r['bench']}: {r['row']}") for r in rows)
        out += ["", f"{'benchmark / row':<{w}}  {'old ms':>10}  {'new ms':>10}  {'ratio':>6}  flag"]
        for r in rows:
            out.append(f"{r['bench'] + ': ' + r['row']:<{w}}  {r['old_ms']:>10.4g}  {r['new_ms']:>10.4g}  "
                       f"{r['ratio']:>6.3f}  {r['flag']}{'  ' + r['note'] if r['note'] else ''}")
    for key, title in (("unmatched", "benchmarks compared on no row (exit 2)"),
                       ("errors", "rows that failed in the new run"),
                       ("no_figure", "rows whose new run lost the baseline's time figure"),
                       ("missing", "baseline rows missing from the new run"),
                       ("added", "new rows without a baseline"),
                       ("no_baseline", "benchmarks without a baseline of this card"),
                       ("not_rerun", "baseline benchmarks not in the new run")):
        if report[key]:
            out += ["", f"{title} ({len(report[key])}):"] + [f"  {x}" for x in report[key]]
    n, f = len(rows), len(report["flagged"])
    n_graph = sum(r.get("figure") == "graph" for r in rows)
    f_graph = sum(r.get("figure") == "graph" for r in report["flagged"])
    if n_graph:  # a [graph] line is a second figure of a row already counted: say which figure was slower
        summary = (f"{f - f_graph} of {n - n_graph} compared rows more than {threshold:.0%} slower (median); "
                   f"{f_graph} of {n_graph} in their CUDA-graph device time ([graph])")
    else:
        summary = f"{f} of {n} compared rows more than {threshold:.0%} slower (median)"
    out += ["", summary + (f"; {len(report['missing'])} missing" if report["missing"] else "")]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("new", type=Path, help="folder of new results (<bench>.json files)")
    ap.add_argument("--baseline", default="auto",
                    help="folder of old results, or 'auto': the newest committed results of the same card")
    ap.add_argument("--threshold", type=float, default=0.10,
                    help="flag rows whose median is more than this fraction slower (default 0.10)")
    ap.add_argument("--warn-only", action="store_true", help="print the flags but exit 0")
    ap.add_argument("--fail-on-missing", action="store_true",
                    help="also exit 1 when baseline rows (or, with a --baseline folder, whole benchmarks) are "
                         "missing from the new run or lost their time figure")
    ap.add_argument("--results-root", type=Path, default=RESULTS_DIR,
                    help="where --baseline auto looks (default benchmarks/results)")
    ap.add_argument("--ignore-field", action="append", default=[],
                    help="a row field that is not part of a row's identity (repeatable)")
    ap.add_argument("--json", type=Path, help="also write the report as JSON")
    args = ap.parse_args(argv)
    if not 0 <= args.threshold < float("inf"):  # nan passed every row
        ap.error(f"--threshold must be a number >= 0, not {args.threshold}")
    if args.json is not None and args.json.is_dir():
        ap.error(f"--json {args.json} is a folder; give a file name")
    try:
        report = compare(args.new, args.baseline, args.threshold, args.results_root, set(args.ignore_field))
    except CompareError as e:
        print(f"compare: {e}", file=sys.stderr)
        return 2
    print(format_report(report, args.threshold))
    if args.json:
        try:
            args.json.write_text(json.dumps(report, indent=1, default=str) + "\n")
        except OSError as e:  # exit 1 is "regression": a report that cannot be written is not one
            print(f"compare: --json {args.json}: {e.strerror or e}", file=sys.stderr)
            return 2
    # a benchmark that now fails (or computes a wrong result) is a regression as surely as a slower one
    failed = bool(report["flagged"] or report["errors"]) or (
        args.fail_on_missing and bool(report["missing"] or report["no_figure"] or report["not_rerun"]))
    if failed and not args.warn_only:
        return 1
    return 2 if report["unmatched"] else 0  # --warn-only softens slower rows, not a check that checked nothing


if __name__ == "__main__":
    sys.exit(main())
