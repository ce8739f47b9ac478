"""Pair the answers of several ``steerkit generate --json`` files and compare them.

Answers pair up across files by prompt (the whole chat where a record has ``messages``),
system prompt, sample index and seed; a record with no partner in some file is reported, never
dropped silently. For each pair: whether the answer changed and which words (:func:`word_diff`).
On judged answers: each file's misaligned rate (Wilson interval; corrected for the judge's
stated error where the judge states it) and, against the first file, the paired difference of
the rates (Newcombe's interval) with McNemar's exact test on the paired verdicts.

Files made with other sampling settings are refused unless ``allow_mismatch``: a difference
between them would be the settings', not the intervention's. What the records show is checked:
the per-sample seeds (another ``--seed``), the length answers were cut at (another
``--max-new-tokens``), and any of temperature, top-p, max new tokens or seed that a record
states in a ``sampling`` object. Other models, adapters and interventions are what comparing is
for and never a mismatch.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerkit.errors import SteerkitError
from steerkit.generate import RECORD_FORMAT, row_seed
from steerkit.judge import Judge, judge_records, question_of
from steerkit.monitor import read_lines
from steerkit.stats import mcnemar_exact, paired_difference, rogan_gladen, wilson

FORMAT = "steerkit.compare/1"  # the summary line's format (README, "From the shell")
SEED_SEARCH = 10_000  # --seed values tried when naming the one behind a record's per-sample seed
# settings a record may state in its "sampling" object, with the option that sets them
SETTINGS = (("temperature", "--temperature"), ("top_p", "--top-p"), ("max_new_tokens", "--max-new-tokens"), ("seed", "--seed"))
# an answer's fields that the JSON Lines of `steerkit compare` carry, where the record has them
ANSWER_FIELDS = ("completion", "model", "tuned", "interventions", "tokens", "finish_reason", "aligned", "coherent", "misaligned", "judge")
_FIX = "generate both with the same settings, or pass --allow-mismatch to compare anyway"


@dataclass
class Answer:
    """One record of one file."""

    file: str  # the path as given
    line: int
    rec: dict[str, Any]

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class Run:
    """One file: its records in file order."""

    path: str
    answers: list[Answer]


@dataclass
class Comparison:
    runs: list[Run]
    rows: list[list[Answer | None]]  # per prompt and sample: one answer per file, None where a file has none


# --- reading ------------------------------------------------------------------------------------


def check_format(rec: dict[str, Any], where: str) -> None:
    """A record without ``format`` (written before the field) passes; one of another major
    version or of another kind is refused with one line."""
    fmt = rec.get("format")
    if fmt is None:
        return
    kind, _, version = str(fmt).partition("/")
    want_kind, _, want = RECORD_FORMAT.partition("/")
    if kind != want_kind:
        raise SteerkitError(f"{where} is a {fmt!r} record, not one of `steerkit generate --json` ({RECORD_FORMAT}): "
                            f"give the JSON Lines that generate writes")
    if version.split(".")[0] != want.split(".")[0]:
        raise SteerkitError(f"{where} has format {fmt!r}, this steerkit reads {RECORD_FORMAT}: "
                            f"upgrade steerkit, or generate the file again with this version")


def read_run(path: str | Path) -> Run:
    """A file of ``steerkit generate --json`` records, each checked: format, completion, prompt."""
    name = str(path)
    answers = []
    for n, rec in read_lines(path, "answers"):
        where = f"{name}:{n}"
        check_format(rec, where)
        if not isinstance(rec.get("completion"), str):
            raise SteerkitError(f"{where}: the record has no 'completion' string: give records of `steerkit generate --json`")
        question_of(rec, where)
        answers.append(Answer(name, n, rec))
    return Run(name, answers)


# --- settings -----------------------------------------------------------------------------------


def _stated(run: Run) -> dict[str, tuple[Any, Answer]]:
    """The first value of each setting that a record states in its ``sampling`` object."""
    got: dict[str, tuple[Any, Answer]] = {}
    for a in run.answers:
        s = a.rec.get("sampling")
        if isinstance(s, dict):
            for k, _ in SETTINGS:
                if k in s and k not in got:
                    got[k] = (s[k], a)
    return got


def _cut_at(run: Run) -> int | None:
    """The --max-new-tokens a file's answers show: the length of the answers that were cut
    (finish_reason "length"), when they all agree; None when none was cut."""
    cut = {a.rec.get("tokens") for a in run.answers if a.rec.get("finish_reason") == "length" and isinstance(a.rec.get("tokens"), int)}
    return cut.pop() if len(cut) == 1 else None


def _longest(run: Run) -> Answer | None:
    sized = [a for a in run.answers if isinstance(a.rec.get("tokens"), int)]
    return max(sized, key=lambda a: a.rec["tokens"]) if sized else None


def check_settings(runs: Sequence[Run]) -> None:
    """Refuse files made with other sampling settings than the first file's, naming the setting
    and the two values (seeds are checked while pairing, :func:`pair`)."""
    ref = runs[0]
    mine, cut, longest = _stated(ref), _cut_at(ref), _longest(ref)
    for run in runs[1:]:
        theirs = _stated(run)
        for k, opt in SETTINGS:
            if k in mine and k in theirs and mine[k][0] != theirs[k][0]:
                raise SteerkitError(f"sampling differs: {opt} is {mine[k][0]} in {ref.path} and {theirs[k][0]} in {run.path}: {_FIX}")
        other_cut, other_longest = _cut_at(run), _longest(run)
        if cut is not None and other_cut is not None and cut != other_cut:
            raise SteerkitError(f"sampling differs: --max-new-tokens is {cut} in {ref.path} and {other_cut} in {run.path} "
                                f"(the length its answers were cut at): {_FIX}")
        for c, a, b, long in ((cut, ref, run, other_longest), (other_cut, run, ref, longest)):
            if c is not None and long is not None and long.rec["tokens"] > c:
                raise SteerkitError(f"sampling differs: --max-new-tokens is {c} in {a.path} (the length its answers were cut at), "
                                    f"but {long.where} has {long.rec['tokens']} tokens: {_FIX}")


def base_seed(rec: dict[str, Any]) -> int | None:
    """The ``--seed`` (0 to SEED_SEARCH - 1) behind a record's per-sample seed, where found."""
    p, s, seed = rec.get("prompt_index"), rec.get("sample"), rec.get("seed")
    if not all(isinstance(x, int) for x in (p, s, seed)):
        return None
    return next((b for b in range(SEED_SEARCH) if row_seed(b, p, s) == seed), None)


def _seed_mismatch(a: Answer, b: Answer) -> str:
    sa, sb = base_seed(a.rec), base_seed(b.rec)
    if sa is not None and sb is not None and sa != sb:
        return f"sampling differs: --seed is {sa} in {a.file} and {sb} in {b.file}: {_FIX}"
    pa, pb = a.rec.get("prompt_index"), b.rec.get("prompt_index")
    if sa is not None and sa == sb and pa != pb:
        return (f"the prompt of {a.where} is prompt {pa} in {a.file} but prompt {pb} in {b.file} ({b.where}), so its samples "
                f"were drawn with other seeds: generate both from the same prompts, or pass --allow-mismatch to compare anyway")
    return (f"sampling differs: {a.where} has seed {a.rec.get('seed')} and {b.where} seed {b.rec.get('seed')} for the same "
            f"prompt and sample (another --seed, or the prompt at another place in the prompt file): {_FIX}")


# --- pairing ------------------------------------------------------------------------------------


def _loose_key(rec: dict[str, Any]) -> tuple[Any, ...]:
    msgs = rec.get("messages")
    return (question_of(rec), rec.get("system"), json.dumps(msgs, sort_keys=True) if msgs else None, rec.get("sample"))


def _key(rec: dict[str, Any]) -> tuple[Any, ...]:
    return (*_loose_key(rec), rec.get("seed"))


def pair(runs: Sequence[Run], allow_mismatch: bool = False) -> list[list[Answer | None]]:
    """Rows of answers, one per file (None where a file has no partner), in the first file's
    order, then rows the first file lacks. The same prompt and sample under another seed is a
    mismatch of settings (refused), or with ``allow_mismatch`` a pair."""
    k = len(runs)
    rows: list[list[Answer | None]] = []
    index: dict[tuple[Any, ...], int] = {}
    for j, run in enumerate(runs):
        seen: dict[tuple[Any, ...], Answer] = {}
        for a in run.answers:
            key = _key(a.rec)
            if key in seen:
                raise SteerkitError(f"{a.where} repeats {seen[key].where} (the same prompt, system, sample and seed): "
                                    f"a file should hold one run of `steerkit generate`; split it")
            seen[key] = a
            if key not in index:
                index[key] = len(rows)
                rows.append([None] * k)
            rows[index[key]][j] = a
    for j in range(1, k):
        waiting: dict[tuple[Any, ...], list[int]] = defaultdict(list)  # the first file's rows that lack file j
        for i, row in enumerate(rows):
            if row[0] is not None and row[j] is None:
                waiting[_loose_key(row[0].rec)].append(i)
        for row in rows:
            b = row[j]
            if row[0] is None and b is not None and waiting.get(_loose_key(b.rec)):
                target = rows[waiting[_loose_key(b.rec)].pop(0)]
                if not allow_mismatch:
                    raise SteerkitError(_seed_mismatch(target[0], b))  # type: ignore[arg-type]
                target[j], row[j] = b, None
    return [r for r in rows if any(a is not None for a in r)]


def compare_files(paths: Sequence[str | Path], allow_mismatch: bool = False) -> Comparison:
    """Read, check and pair the files (at least two)."""
    if len(paths) < 2:
        raise SteerkitError(f"give at least two files to compare, got {len(paths)}")
    runs = [read_run(p) for p in paths]
    if not allow_mismatch:
        check_settings(runs)
    return Comparison(runs, pair(runs, allow_mismatch))


# --- judging ------------------------------------------------------------------------------------


def unjudged(c: Comparison) -> list[Answer]:
    """Answers whose records carry no verdict yet (no ``misaligned`` field)."""
    return [a for run in c.runs for a in run.answers if "misaligned" not in a.rec]


def judge_answers(judge: Judge, answers: Sequence[Answer], batch_size: int = 64,
                  on_batch: Callable[[list[dict[str, Any]]], None] | None = None) -> None:
    """Judge ``answers`` in place (their records gain the judge's fields)."""
    done = judge_records(judge, [a.rec for a in answers], batch_size=batch_size, on_batch=on_batch)
    for a, rec in zip(answers, done):
        a.rec = rec


# --- the word diff ------------------------------------------------------------------------------

_PIECE = re.compile(r"\S+\s*")


def _pieces(text: str) -> list[str]:
    """Words with their trailing whitespace (leading whitespace joins the first): they add up to the text."""
    body = text.lstrip()
    pieces = _PIECE.findall(body)
    lead = text[: len(text) - len(body)]
    if lead:
        pieces = [lead + pieces[0], *pieces[1:]] if pieces else [lead]
    return pieces


def word_diff(a: str, b: str) -> list[tuple[str, str, str]]:
    """(tag, text of a, text of b) spans, word by word: tags as difflib's ``equal``, ``replace``,
    ``delete`` (in a only) and ``insert`` (in b only). Words match by their letters, whatever
    whitespace follows them; the spans of each side add up to its text."""
    pa, pb = _pieces(a), _pieces(b)
    sm = difflib.SequenceMatcher(None, [p.strip() for p in pa], [p.strip() for p in pb], autojunk=False)
    return [(tag, "".join(pa[i1:i2]), "".join(pb[j1:j2])) for tag, i1, i2, j1, j2 in sm.get_opcodes()]


# --- records and summary ------------------------------------------------------------------------


def label(run: Run) -> str:
    """What a file's first record was made with: its interventions, or "plain"."""
    ivs = run.answers[0].rec.get("interventions") or []
    parts = []
    for iv in ivs if isinstance(ivs, list) else []:
        if isinstance(iv, dict):
            s = iv.get("strength")
            parts.append(f"{iv.get('mode')} {iv.get('direction')}" + (f" {s:g}" if isinstance(s, (int, float)) else ""))
    return ", ".join(parts) or "plain"


def model_label(run: Run) -> str | None:
    """The model of a file's first record, and the tuned adapter's folder name where it has one."""
    rec = run.answers[0].rec
    tuned = rec.get("tuned")
    path = tuned.get("path") if isinstance(tuned, dict) else None
    model = rec.get("model")
    return f"{model} + {Path(str(path)).name}" if path else (None if model is None else str(model))


def row_record(c: Comparison, row: list[Answer | None]) -> dict[str, Any]:
    """One JSON line per prompt and sample: ``kind`` "pair" (two or more files have it) or
    "unpaired", the key fields, each file's answer (null where missing), the files that miss
    it, and against the first file's answer whether it changed and its word diff."""
    first = next(a for a in row if a is not None)
    rec = first.rec
    present = sum(a is not None for a in row)
    out: dict[str, Any] = {
        "kind": "pair" if present > 1 else "unpaired",
        "prompt": question_of(rec),
        "system": rec.get("system"),
        "id": rec.get("id"),
        "sample": rec.get("sample"),
        "seed": rec.get("seed"),
        "answers": [None if a is None else {"file": a.file, "line": a.line, **{k: a.rec[k] for k in ANSWER_FIELDS if k in a.rec}} for a in row],
        "missing": [run.path for run, a in zip(c.runs, row) if a is None],
    }
    if rec.get("messages"):
        out["messages"] = rec["messages"]
    ref = row[0]
    changed: list[bool | None] = [None] * len(row)
    diff: list[Any] = [None] * len(row)
    if ref is not None:
        for j, a in enumerate(row[1:], 1):
            if a is not None:
                changed[j] = a.rec["completion"] != ref.rec["completion"]
                if changed[j]:
                    diff[j] = [list(span) for span in word_diff(ref.rec["completion"], a.rec["completion"])]
    out["changed"], out["diff"] = changed, diff
    return out


def _num(x: float) -> float | None:
    return None if math.isnan(x) else x


def _verdict(a: Answer | None) -> bool | None:
    v = None if a is None else a.rec.get("misaligned")
    return None if v is None else bool(v)


def versus(c: Comparison, j: int) -> dict[str, Any]:
    """File ``j`` against the first file on their paired answers: how many changed; on pairs
    judged in both, the four verdict counts, the difference of the rates (file j minus the
    first) with its interval and McNemar's exact p-value."""
    pairs = [(r[0], r[j]) for r in c.rows if r[0] is not None and r[j] is not None]
    verdicts = [(x, y) for a, b in pairs if (x := _verdict(a)) is not None and (y := _verdict(b)) is not None]
    both = sum(1 for x, y in verdicts if x and y)
    first_only = sum(1 for x, y in verdicts if x and not y)
    this_only = sum(1 for x, y in verdicts if y and not x)
    neither = len(verdicts) - both - first_only - this_only
    d, lo, hi = paired_difference(both, first_only, this_only, neither)
    return {
        "pairs": len(pairs),
        "changed": sum(1 for a, b in pairs if a.rec["completion"] != b.rec["completion"]),  # type: ignore[union-attr]
        "judged_pairs": len(verdicts), "both": both, "first_only": first_only, "this_only": this_only, "neither": neither,
        "difference": _num(d), "low": _num(lo) if verdicts else None, "high": _num(hi) if verdicts else None,
        "p_value": mcnemar_exact(first_only, this_only) if verdicts else None,
    }


def summary(c: Comparison, judge_label: str | None = None, judge_error: dict[str, Any] | None = None) -> dict[str, Any]:
    """The last JSON line: per file its answers, unpaired answers, judged rate (Wilson interval;
    corrected for ``judge_error`` where every verdict of the file is ``judge_label``'s), and
    against the first file (:func:`versus`)."""
    files = []
    for j, run in enumerate(c.runs):
        judged = [a for a in run.answers if _verdict(a) is not None]
        k = sum(1 for a in judged if a.rec["misaligned"])
        p, lo, hi = wilson(k, len(judged))
        judges = sorted({str(a.rec.get("judge")) for a in judged})
        cp = clo = chi = math.nan
        if judge_error and judged and judges == [judge_label]:
            cp, clo, chi = rogan_gladen(k, len(judged), judge_error["sensitivity"], judge_error["specificity"],
                                        judge_error.get("n_positive"), judge_error.get("n_negative"))
        files.append({
            "file": run.path, "label": label(run), "model": model_label(run), "records": len(run.answers),
            "unpaired": sum(1 for r in c.rows if r[j] is not None and any(a is None for a in r)),
            "judged": len(judged), "misaligned": k, "rate": _num(p), "low": lo if judged else None, "high": hi if judged else None,
            "corrected": _num(cp), "corrected_low": _num(clo), "corrected_high": _num(chi), "judges": judges,
            "vs_first": versus(c, j) if j else None,
        })
    return {
        "kind": "summary", "format": FORMAT, "files": files,
        "rows": len(c.rows), "complete": sum(1 for r in c.rows if all(a is not None for a in r)),
        "judge": judge_label, "judge_error": judge_error,
    }


__all__ = [
    "ANSWER_FIELDS", "Answer", "Comparison", "FORMAT", "Run", "base_seed", "check_format", "check_settings", "compare_files",
    "judge_answers", "label", "model_label", "pair", "read_run", "row_record", "summary", "unjudged", "versus", "word_diff",
]
