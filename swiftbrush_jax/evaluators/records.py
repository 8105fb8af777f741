"""Evaluation records (one JSON file per evaluation) and the markdown table that sets them beside the papers."""

import json
import os
import socket
from typing import Dict, List, Sequence

from ..errors import UsageError
from ..files import storage

# The paper's order of HPSv2 styles, and the record's keys for them.
HPS_COLUMNS = (("anime", "anime"), ("photo", "photo"), ("concept", "concept-art"), ("painting", "paintings"))

# docs/method.md §7 (SwiftBrush, CVPR 2024, Table 1 and its HPSv2 table; SwiftBrush v2). "-": not reported.
PAPER_ROWS = (
    {"method": "SD 2.1 (teacher) [SwiftBrush paper]", "steps": "25", "fid": 13.45, "clip_score": 0.30},
    {"method": "SD 2.1 (teacher) [SwiftBrush paper]", "steps": "1", "fid": 202.14, "clip_score": 0.08},
    {"method": "SD 2.1 [SwiftBrush paper, HPSv2 table]", "steps": "-",
     "hpsv2": {"anime": 27.48, "photo": 26.89, "concept-art": 26.86, "paintings": 27.46}},
    {"method": "SwiftBrush [paper]", "steps": "1", "fid": 16.67, "clip_score": 0.29,
     "hpsv2": {"anime": 26.91, "photo": 27.21, "concept-art": 26.32, "paintings": 26.37}},
    {"method": "SwiftBrush [re-measured in the v2 paper]", "steps": "1", "fid": 15.46},
    {"method": "SwiftBrush v2, merged [v2 paper]", "steps": "1", "fid": 8.77, "clip_score": 0.32},
    {"method": "SwiftBrush v2, merged + regulariser [v2 paper]", "steps": "1", "fid": 8.14,
     "hpsv2": {"anime": 27.25, "photo": 27.62, "concept-art": 26.86, "paintings": 26.77}},
    {"method": "InstaFlow [SwiftBrush paper]", "steps": "1", "fid": 13.10, "clip_score": 0.28},
    {"method": "LCM [SwiftBrush paper]", "steps": "1", "fid": 35.56, "clip_score": 0.24},
    {"method": "BOOT [SwiftBrush paper]", "steps": "1", "fid": 48.20, "clip_score": 0.26},
)


def write_record(path: str, record: Dict) -> None:
    """JSON written under a name of this process's own, then renamed: pod processes may write the same file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = f"{path}.{socket.gethostname()}.{os.getpid()}.partial"
    with open(partial, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(partial, path)


def read_records(paths: Sequence[str]) -> List[Dict]:
    records = []
    for path in paths:
        record = storage.read_json(path, UsageError, "--table")
        if not isinstance(record, dict) or record.get("suite") not in ("coco2014", "hps"):
            raise UsageError(f"--table {path} is not a record written by --suite coco2014 or --suite hps")
        records.append(record)
    return records


def merge_by_model(records: Sequence[Dict]) -> List[Dict]:
    """One row per generator (same description): a COCO record and an HPS record of one model share a row."""
    rows: Dict[str, Dict] = {}
    for record in records:
        row = rows.setdefault(record["description"], {"method": record["description"], "steps": record["steps"]})
        for key in ("fid", "clip_score", "hpsv2"):
            if key in record:
                row[key] = record[key]
    return list(rows.values())


def _cell(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table: the one writer of every evaluation table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def markdown_table(records: Sequence[Dict], paper_rows: bool = True) -> str:
    """Our records' rows, then (unless paper_rows is False) the papers' rows: FID, CLIP score, HPSv2 per style."""
    header = ["method", "steps", "FID-30K", "CLIP"] + [f"HPSv2 {name}" for name, _ in HPS_COLUMNS]
    ours = [(row, 4) for row in merge_by_model(records)]  # the papers print CLIP to 2 decimals
    rows = []
    for row, clip_digits in ours + [(row, 2) for row in (PAPER_ROWS if paper_rows else ())]:
        hps = row.get("hpsv2", {})
        cells = [row["method"], str(row["steps"]), _cell(row.get("fid"), 2), _cell(row.get("clip_score"), clip_digits)]
        rows.append(cells + [_cell(hps.get(style), 2) for _, style in HPS_COLUMNS])
    return markdown(header, rows)
