"""Edit requests: one parser for plain, CounterFact and zsRE records (JSON or JSON Lines).

A bad record raises :class:`RequestError` naming the record's index and the offending field.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path


class RequestError(ValueError):
    """A request record is malformed. ``index`` and ``field`` say where."""

    def __init__(self, message: str, index: int | None = None, field: str | None = None):
        where = []
        if index is not None:
            where.append(f"record {index}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
        self.index = index
        self.field = field


@dataclass(frozen=True)
class EditRequest:
    """One fact to rewrite: ``prompt.format(subject)`` should continue with ``" " + target_new``.

    Optional evaluation material travels with the request (CounterFact/zsRE fields).
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    attribute_prompts: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    loc: str | None = None
    loc_ans: str | None = None
    source_format: str = "plain"
    case_id: str | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.format(self.subject)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def _str(record: dict, key: str, index: int, *, required: bool = True, where: str | None = None) -> str | None:
    name = where or key
    value = record.get(key)
    if value is None:
        if required:
            raise RequestError("is missing", index, name)
        return None
    if isinstance(value, dict) and "str" in value:  # CounterFact {"str": ..., "id": ...}
        value = value["str"]
    if not isinstance(value, str):
        raise RequestError(f"must be a string, got {type(value).__name__}", index, name)
    if required and not value.strip():
        raise RequestError("is empty", index, name)
    return value


def _str_list(record: dict, key: str, index: int) -> tuple[str, ...]:
    value = record.get(key) or []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RequestError("must be a list of strings", index, key)
    return tuple(value)


def _check_prompt(prompt: str, index: int, name: str) -> None:
    if prompt.count("{}") != 1 or prompt.replace("{}", "").count("{") or prompt.replace("{}", "").count("}"):
        raise RequestError(f"must contain exactly one '{{}}' where the subject goes, got {prompt!r}",
                           index, name)


def _from_counterfact(record: dict, index: int) -> EditRequest:
    rw = record["requested_rewrite"]
    if not isinstance(rw, dict):
        raise RequestError("must be an object", index, "requested_rewrite")
    prompt = _str(rw, "prompt", index, where="requested_rewrite.prompt")
    subject = _str(rw, "subject", index, where="requested_rewrite.subject")
    new = _str(rw, "target_new", index, where="requested_rewrite.target_new")
    true = _str(rw, "target_true", index, required=False, where="requested_rewrite.target_true")
    _check_prompt(prompt, index, "requested_rewrite.prompt")
    return EditRequest(
        prompt=prompt, subject=subject, target_new=new, target_true=true,
        paraphrase_prompts=_str_list(record, "paraphrase_prompts", index),
        neighborhood_prompts=_str_list(record, "neighborhood_prompts", index),
        attribute_prompts=_str_list(record, "attribute_prompts", index),
        generation_prompts=_str_list(record, "generation_prompts", index),
        source_format="counterfact", case_id=str(record.get("case_id", index)),
    )


def _from_zsre(record: dict, index: int) -> EditRequest:
    subject = _str(record, "subject", index)
    src = _str(record, "src", index)
    if subject not in src:
        raise RequestError(f"subject {subject!r} does not occur in the question", index, "src")
    answers = record.get("answers") or []
    true = answers[0] if isinstance(answers, list) and answers and isinstance(answers[0], str) else None
    return EditRequest(
        prompt=src.replace("{", "{{").replace("}", "}}").replace(subject, "{}", 1),
        subject=subject, target_new=_str(record, "alt", index), target_true=true,
        paraphrase_prompts=tuple(p for p in [_str(record, "rephrase", index, required=False)] if p),
        loc=_str(record, "loc", index, required=False),
        loc_ans=_str(record, "loc_ans", index, required=False),
        source_format="zsre", case_id=str(record.get("case_id", index)),
    )


def _from_plain(record: dict, index: int) -> EditRequest:
    prompt = _str(record, "prompt", index)
    subject = _str(record, "subject", index)
    new = _str(record, "target_new", index)
    _check_prompt(prompt, index, "prompt")
    return EditRequest(
        prompt=prompt, subject=subject, target_new=new,
        target_true=_str(record, "target_true", index, required=False),
        paraphrase_prompts=_str_list(record, "paraphrase_prompts", index),
        neighborhood_prompts=_str_list(record, "neighborhood_prompts", index),
        generation_prompts=_str_list(record, "generation_prompts", index),
        source_format="plain", case_id=str(record["case_id"]) if "case_id" in record else None,
    )


def parse_record(record: object, index: int) -> EditRequest:
    """One record in any supported shape -> :class:`EditRequest`."""
    if not isinstance(record, dict):
        raise RequestError(f"must be a JSON object, got {type(record).__name__}", index)
    if "requested_rewrite" in record:
        return _from_counterfact(record, index)
    if "src" in record and "alt" in record:
        return _from_zsre(record, index)
    return _from_plain(record, index)


def check_duplicates(requests: Sequence[EditRequest]) -> list[EditRequest]:
    """Drop exact repeats; reject two different targets for the same (subject, prompt)."""
    seen: dict[tuple[str, str], tuple[int, str]] = {}
    kept = []
    for i, r in enumerate(requests):
        key = (r.subject, r.prompt)
        if key in seen:
            first, target = seen[key]
            if target != r.target_new:
                raise RequestError(
                    f"conflicts with record {first}: same subject and prompt, target_new "
                    f"{target!r} vs {r.target_new!r}", i, "target_new")
            continue
        seen[key] = (i, r.target_new)
        kept.append(r)
    return kept


def parse_requests(records: Iterable[object]) -> list[EditRequest]:
    """Validate and convert records (already decoded JSON objects)."""
    return check_duplicates([parse_record(r, i) for i, r in enumerate(records)])


def decode_text(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RequestError(f"input is not UTF-8 (invalid byte at offset {exc.start})") from None


def parse_request_text(text: str, jsonl: bool | None = None) -> list[EditRequest]:
    """Parse a JSON array (or a single object, or ``{"requests": [...]}``) or JSON Lines."""
    stripped = text.lstrip()
    if not stripped:
        raise RequestError("input is empty")
    if jsonl is None:
        jsonl = not stripped.startswith("[") and len(stripped.splitlines()) > 1 and _is_jsonl(stripped)
    if jsonl:
        records = []
        for line_no, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise RequestError(f"invalid JSON on line {line_no + 1}: {exc.msg}",
                                       len(records)) from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RequestError(f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
        if isinstance(data, dict) and isinstance(data.get("requests"), list):
            data = data["requests"]
        records = data if isinstance(data, list) else [data]
    if not records:
        raise RequestError("contains no requests")
    return parse_requests(records)


def _is_jsonl(text: str) -> bool:
    try:
        json.loads(text)
        return False
    except json.JSONDecodeError:
        return True


def load_requests(path: str | os.PathLike) -> list[EditRequest]:
    """Read a request file (``.json`` or ``.jsonl``; the content decides when the suffix is other)."""
    p = Path(path)
    if not p.is_file():
        raise RequestError(f"request file {str(p)!r} does not exist")
    suffix = p.suffix.lower()
    return parse_request_text(decode_text(p.read_bytes()),
                              jsonl=True if suffix == ".jsonl" else (False if suffix == ".json" else None))


def check_tokenizable(requests: Sequence[EditRequest], tokenizer: object) -> None:
    """Reject targets or subjects that tokenise to nothing with this tokenizer."""
    for i, r in enumerate(requests):
        for name, value in (("target_new", r.target_new), ("subject", r.subject)):
            ids = tokenizer(" " + value if name == "target_new" else value,  # type: ignore[operator]
                            add_special_tokens=False)["input_ids"]
            if len(ids) == 0:
                raise RequestError(f"{value!r} tokenises to nothing", i, name)


def requests_digest(requests: Sequence[EditRequest]) -> str:
    """A stable SHA-256 of the parsed requests (independent of file formatting)."""
    payload = json.dumps([r.to_dict() for r in requests], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()
