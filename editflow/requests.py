"""Edit requests: one parser for plain, CounterFact and zsRE records (JSON or JSON Lines).

A bad record raises :class:`RequestError` naming the record's index and the offending field; user
text is quoted with :func:`editflow.text.safe` (escaped, truncated). Files are read only when they are
regular files of at most ``MAX_FILE_BYTES``; at most ``MAX_REQUESTS`` records are accepted per run.
Checks that need the tokenizer (:func:`check_tokenizable`, :func:`check_lengths`) run once it is
loaded, before any model work.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from editflow.text import safe

#: Largest request file read (bytes); a larger file, or a device such as /dev/zero, is refused unread.
MAX_FILE_BYTES = 256 * 2**20
#: Most requests accepted per run unless the caller passes ``max_requests``. 10,000 is the largest
#: batch the MEMIT paper edits at once; loading and validating 10,000 CounterFact records takes ~3 s
#: (16 MB), 100,000 ~36 s (165 MB), while editing costs ~1.4 s per request on CPU (README benchmark at
#: 1,000), so a larger file is far more likely a mistake than an intended run.
MAX_REQUESTS = 10_000
#: Text that is a special token of common causal-LM tokenizers (``<|endoftext|>``, ``<s>``, ...).
SPECIAL_TOKEN_TEXT = re.compile(r"<\|[^<>|\s]{0,64}\|>|</?s>|<(?:unk|pad|eos|bos|mask)>", re.IGNORECASE)


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


# ----------------------------------------------------------------------------- text checks


def visible(text: str) -> str:
    """``text`` after normalisation: NFKC, invisible (format) characters removed, whitespace collapsed."""
    text = "".join(c for c in unicodedata.normalize("NFKC", text) if unicodedata.category(c) != "Cf")
    return " ".join(text.split())


#: Characters no request text may hold: C0/C1 controls (tab and newline allowed in prompts) and lone surrogates.
_BAD_CHARS = {
    True: re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]"),
    False: re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]"),
}


def _bad_char(text: str, multiline: bool) -> tuple[int, str] | None:
    """Position and description of the first character a request may not hold, or ``None``."""
    found = _BAD_CHARS[multiline].search(text)
    if found is None:
        return None
    code = ord(found.group())
    what = "a lone surrogate" if 0xD800 <= code <= 0xDFFF else "the control character"
    return found.start(), f"{what} (U+{code:04X})"


def _check_chars(text: str, index: int, name: str, multiline: bool = True) -> None:
    bad = _bad_char(text, multiline)
    if bad is not None:
        raise RequestError(f"contains {bad[1]} at position {bad[0]}: {safe(text)}", index, name)


def _check_text(text: str, index: int, name: str, kind: str) -> str:
    """Validate one prompt, subject or target (``kind``): characters, visible content, special tokens."""
    _check_chars(text, index, name, multiline=kind == "prompt")
    if kind != "prompt" and not visible(text):
        raise RequestError(
            f"is empty after normalisation (only whitespace or invisible characters): {safe(text)}", index, name
        )
    special = SPECIAL_TOKEN_TEXT.search(text)
    if special:
        raise RequestError(f"contains the special token {safe(special.group())}: {safe(text)}", index, name)
    return text


# ----------------------------------------------------------------------------- record fields


def _str(
    record: dict, key: str, index: int, *, required: bool = True, where: str | None = None, kind: str = "prompt"
) -> str | None:
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
    if not required and not value:
        return None
    return _check_text(value, index, name, kind)


def _str_list(record: dict, key: str, index: int) -> tuple[str, ...]:
    value = record.get(key) or []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RequestError("must be a list of strings", index, key)
    for k, v in enumerate(value):
        _check_chars(v, index, f"{key}[{k}]")
    return tuple(value)


def _check_prompt(prompt: str, index: int, name: str) -> None:
    if prompt.count("{}") != 1 or prompt.replace("{}", "").count("{") or prompt.replace("{}", "").count("}"):
        raise RequestError(f"must contain exactly one '{{}}' where the subject goes, got {safe(prompt)}", index, name)


def _check_targets(new: str, true: str | None, index: int, name: str) -> None:
    if true is not None and visible(new) == visible(true):
        raise RequestError(f"equals target_true ({safe(true)}): the edit would change nothing", index, name)


def _from_counterfact(record: dict, index: int) -> EditRequest:
    rw = record["requested_rewrite"]
    if not isinstance(rw, dict):
        raise RequestError("must be an object", index, "requested_rewrite")
    prompt = _str(rw, "prompt", index, where="requested_rewrite.prompt")
    subject = _str(rw, "subject", index, where="requested_rewrite.subject", kind="subject")
    new = _str(rw, "target_new", index, where="requested_rewrite.target_new", kind="target")
    true = _str(rw, "target_true", index, required=False, where="requested_rewrite.target_true", kind="target")
    _check_prompt(prompt, index, "requested_rewrite.prompt")
    _check_targets(new, true, index, "requested_rewrite.target_new")
    return EditRequest(
        prompt=prompt,
        subject=subject,
        target_new=new,
        target_true=true,
        paraphrase_prompts=_str_list(record, "paraphrase_prompts", index),
        neighborhood_prompts=_str_list(record, "neighborhood_prompts", index),
        attribute_prompts=_str_list(record, "attribute_prompts", index),
        generation_prompts=_str_list(record, "generation_prompts", index),
        source_format="counterfact",
        case_id=_case_id(record, index, index),
    )


def _case_id(record: dict, index: int, default: object) -> str | None:
    value = record.get("case_id", default)
    if value is None:
        return None
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise RequestError(f"must be a string or an integer, got {type(value).__name__}", index, "case_id")
    _check_chars(str(value), index, "case_id", multiline=False)
    return str(value)


def _first_answer(record: dict, index: int) -> str | None:
    answers = record.get("answers") or []
    if not (isinstance(answers, list) and answers and isinstance(answers[0], str)) or not answers[0]:
        return None
    return _check_text(answers[0], index, "answers[0]", "target")


def _from_zsre(record: dict, index: int) -> EditRequest:
    subject = _str(record, "subject", index, kind="subject")
    src = _str(record, "src", index)
    if subject not in src:
        raise RequestError(f"subject {safe(subject)} does not occur in the question {safe(src)}", index, "src")
    new = _str(record, "alt", index, kind="target")
    true = _first_answer(record, index)
    _check_targets(new, true, index, "alt")
    return EditRequest(
        prompt=src.replace("{", "{{").replace("}", "}}").replace(subject, "{}", 1),
        subject=subject,
        target_new=new,
        target_true=true,
        paraphrase_prompts=tuple(p for p in [_str(record, "rephrase", index, required=False)] if p),
        loc=_str(record, "loc", index, required=False),
        loc_ans=_str(record, "loc_ans", index, required=False, kind="target"),
        source_format="zsre",
        case_id=_case_id(record, index, index),
    )


def _from_plain(record: dict, index: int) -> EditRequest:
    prompt = _str(record, "prompt", index)
    subject = _str(record, "subject", index, kind="subject")
    new = _str(record, "target_new", index, kind="target")
    true = _str(record, "target_true", index, required=False, kind="target")
    _check_prompt(prompt, index, "prompt")
    _check_targets(new, true, index, "target_new")
    return EditRequest(
        prompt=prompt,
        subject=subject,
        target_new=new,
        target_true=true,
        paraphrase_prompts=_str_list(record, "paraphrase_prompts", index),
        neighborhood_prompts=_str_list(record, "neighborhood_prompts", index),
        generation_prompts=_str_list(record, "generation_prompts", index),
        source_format="plain",
        case_id=_case_id(record, index, None),
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
                    f"{safe(target)} vs {safe(r.target_new)}",
                    i,
                    "target_new",
                )
            continue
        seen[key] = (i, r.target_new)
        kept.append(r)
    return kept


def check_count(n: int, max_requests: int | None) -> None:
    """Refuse more than ``max_requests`` requests (``None``: no limit)."""
    if max_requests is not None and n > max_requests:
        raise RequestError(
            f"{n:,} requests or more, over the limit of {max_requests:,} per run (pass max_requests to raise it)"
        )


def parse_requests(records: Iterable[object], max_requests: int | None = None) -> list[EditRequest]:
    """Validate and convert records (already decoded JSON objects)."""
    records = list(records)
    check_count(len(records), max_requests)
    return check_duplicates([parse_record(r, i) for i, r in enumerate(records)])


# ----------------------------------------------------------------------------- decoding


def decode_text(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RequestError(f"input is not UTF-8 (invalid byte at offset {exc.start})") from None


def _loads(text: str, where: str, index: int | None = None) -> object:
    """``json.loads`` with a :class:`RequestError` for invalid or too deeply nested JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError(f"invalid JSON {where}line {exc.lineno} column {exc.colno}: {exc.msg}", index) from None
    except RecursionError:
        raise RequestError(f"invalid JSON {where}: nested too deeply", index) from None


def _jsonl_records(text: str, max_requests: int | None) -> list[object]:
    records: list[object] = []
    for line_no, line in enumerate(text.splitlines()):
        if line.strip():
            check_count(len(records) + 1, max_requests)
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise RequestError(f"invalid JSON on line {line_no + 1}: {exc.msg}", len(records)) from None
            except RecursionError:
                raise RequestError(f"invalid JSON on line {line_no + 1}: nested too deeply", len(records)) from None
    return records


def _json_records(data: object) -> list[object]:
    if isinstance(data, dict) and isinstance(data.get("requests"), list):
        data = data["requests"]
    return data if isinstance(data, list) else [data]


def _looks_like_jsonl(stripped: str) -> bool:
    """Several lines not starting with ``[`` that are not one JSON document."""
    if stripped.startswith("[") or len(stripped.splitlines()) < 2:
        return False
    try:
        json.loads(stripped)
        return False
    except json.JSONDecodeError:
        return True
    except RecursionError:
        return False


def parse_request_text(
    text: str, jsonl: bool | None = None, max_requests: int | None = MAX_REQUESTS
) -> list[EditRequest]:
    """Parse a JSON array (or a single object, or ``{"requests": [...]}``) or JSON Lines."""
    stripped = text.lstrip()
    if not stripped:
        raise RequestError("input is empty")
    if jsonl is None:
        jsonl = _looks_like_jsonl(stripped)
    records = _jsonl_records(text, max_requests) if jsonl else _json_records(_loads(text, "at "))
    if not records:
        raise RequestError("contains no requests")
    return parse_requests(records, max_requests)


# ----------------------------------------------------------------------------- files


def _file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _stat_request_file(p: Path) -> os.stat_result:
    """``os.stat`` of a request file, with a :class:`RequestError` saying what is wrong with the path."""
    name = safe(str(p), 200)
    try:
        os.lstat(p)
    except OSError:
        raise RequestError(f"request file {name} does not exist") from None
    try:
        st = os.stat(p)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RequestError(f"request file {name} is a symlink loop") from None
        if exc.errno == errno.ENOENT:
            raise RequestError(f"request file {name} is a broken symlink") from None
        raise RequestError(f"request file {name} cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = _file_kind(st.st_mode)
        raise RequestError(
            f"request file {name} is {kind}{'' if kind.startswith('not') else ', not a regular file'}"
            "; give a .json or .jsonl file"
        )
    return st


def read_request_bytes(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular request file of at most ``max_bytes`` (never more are read)."""
    p = Path(path)
    st = _stat_request_file(p)
    too_big = f"request file {safe(str(p), 200)} is over the limit of {max_bytes:,} bytes (pass max_bytes to raise it)"
    if st.st_size > max_bytes:
        raise RequestError(too_big)
    try:
        with open(p, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise RequestError(f"request file {safe(str(p), 200)} cannot be read ({exc.strerror})") from None
    if len(data) > max_bytes:
        raise RequestError(too_big)
    return data


def load_requests(
    path: str | os.PathLike, max_requests: int | None = MAX_REQUESTS, max_bytes: int = MAX_FILE_BYTES
) -> list[EditRequest]:
    """Read a request file (``.json`` or ``.jsonl``; the content decides when the suffix is other)."""
    suffix = Path(path).suffix.lower()
    return parse_request_text(
        decode_text(read_request_bytes(path, max_bytes)),
        jsonl=True if suffix == ".jsonl" else (False if suffix == ".json" else None),
        max_requests=max_requests,
    )


# ----------------------------------------------------------------------------- tokenizer checks


def _special_ids(tokenizer: object) -> dict[int, str]:
    """Special-token ids of ``tokenizer`` and their text."""
    ids = getattr(tokenizer, "all_special_ids", []) or []
    tokens = getattr(tokenizer, "all_special_tokens", []) or []
    return {int(i): str(t) for i, t in zip(ids, tokens)}


def _special_in(ids: Sequence[int], text: str, special: dict[int, str]) -> str | None:
    """The special token ``text`` spells out, among ``ids`` (an id alone may just be an unknown word
    mapped onto, say, ``<eos>`` by a word-level vocabulary)."""
    for i in ids:
        if i in special and special[i] in text:
            return special[i]
    return None


def _fields_to_check(r: EditRequest) -> list[tuple[str, str]]:
    """(field, text) to tokenise: the subject and targets first, so the field named is the narrowest."""
    out = [("subject", r.subject), ("target_new", r.target_new)]
    return out + ([("target_true", r.target_true)] if r.target_true else []) + [("prompt", r.text)]


def _field_ids(tokenizer: object, name: str, value: str) -> list[int]:
    """Token ids of one field as the engine sees it: targets after a space, the rest bare."""
    from editflow.tokens import encode_target

    if name.startswith("target"):
        return encode_target(tokenizer, value)
    return list(tokenizer(value, add_special_tokens=False)["input_ids"])  # type: ignore[operator]


def check_tokenizable(requests: Sequence[EditRequest], tokenizer: object) -> None:
    """Reject targets or subjects that tokenise to nothing visible, and any text holding a special token
    of this tokenizer (``<|endoftext|>``, its BOS/EOS/PAD, added special tokens)."""
    special = _special_ids(tokenizer)
    decode = tokenizer.decode  # type: ignore[attr-defined]
    for i, r in enumerate(requests):
        for name, value in _fields_to_check(r):
            ids = _field_ids(tokenizer, name, value)
            token = _special_in(ids, value, special)
            if token is not None:
                raise RequestError(f"contains the tokenizer's special token {safe(token)}: {safe(value)}", i, name)
            if name != "prompt" and not visible(decode(ids, skip_special_tokens=True)):
                raise RequestError(
                    f"{safe(value)} tokenises to nothing with this tokenizer (no visible token)", i, name
                )


def context_template_allowance(n_templates: int, template_length: int) -> int:
    """Tokens a context template may add before a prompt, before the templates exist: a seed word,
    ``template_length`` generated tokens re-tokenised, and ``". "`` (measured: at most 16 for length 10
    on the default model; 0 without templates)."""
    return 0 if n_templates <= 0 else int(template_length) + 8


def template_allowance(tokenizer: object, templates: Sequence[str]) -> int:
    """Exactly the most tokens one of ``templates`` (``"... {}"`` strings) adds before a prompt."""
    return max(
        (
            len(tokenizer(t.replace("{}", ""), add_special_tokens=False)["input_ids"])  # type: ignore[operator]
            for t in templates
            if t != "{}"
        ),
        default=0,
    )


def _longest_part(tokenizer: object, r: EditRequest, prompt_len: int, targets: dict[str, int]) -> str:
    """The field contributing the most tokens: the prompt's own words, the subject or the longest target."""
    subject_len = len(tokenizer(r.subject, add_special_tokens=False)["input_ids"])  # type: ignore[operator]
    target = max(targets, key=targets.__getitem__)
    parts = {"prompt": prompt_len - subject_len, "subject": subject_len, target: targets[target]}
    return max(parts, key=parts.__getitem__)


def check_lengths(
    requests: Sequence[EditRequest], tokenizer: object, max_positions: int | None, template_tokens: int = 0
) -> None:
    """Reject a request whose prompt + target_new/target_true (+ ``template_tokens`` of context template)
    exceeds ``max_positions`` tokens, naming the record and the longest field. Evaluation prompts are
    not checked: scoring cuts long prefixes on the left."""
    from editflow.tokens import encode, encode_target

    if not max_positions:
        return
    for i, r in enumerate(requests):
        prompt_len = len(encode(tokenizer, r.text))
        targets = {
            name: len(encode_target(tokenizer, t))
            for name, t in (("target_new", r.target_new), ("target_true", r.target_true))
            if t
        }
        target_len = max(targets.values())
        total = prompt_len + target_len + template_tokens
        if total > max_positions:
            raise RequestError(
                f"{total} tokens (prompt {prompt_len}, target {target_len}, context template "
                f"allowance {template_tokens}) exceed the model's {max_positions} positions",
                i,
                _longest_part(tokenizer, r, prompt_len, targets),
            )


# ----------------------------------------------------------------------------- automatic neighbours


def neighbor_index(requests: Sequence[EditRequest], n: int) -> list[list[str]]:
    """For every request i, what ``evaluate.probes.auto_neighbor_texts(requests, i, n)`` returns: up to
    ``n`` texts of request i's prompt with other requests' subjects (cyclic from i+1, each subject once),
    never a subject edited with that prompt (which includes request i's own).

    The edited (prompt → subjects) index is built once, runs of one subject are skipped in one step,
    and a walk stops as soon as no further subject can qualify: O(N · (n + skipped runs)) instead of
    O(N²) for the per-request rebuild.
    """
    subjects = [r.subject for r in requests]
    runs = _subject_runs(subjects)  # start positions of maximal runs of one subject
    run_of = [0] * len(subjects)
    for k, start in enumerate(runs):
        end = runs[k + 1] if k + 1 < len(runs) else len(subjects)
        run_of[start:end] = [k] * (end - start)
    edited: dict[str, set[str]] = {}
    for r in requests:
        edited.setdefault(r.prompt, set()).add(r.subject)
    distinct = len(set(subjects))
    return [
        _neighbors_of(requests, i, n, runs, run_of, edited[requests[i].prompt], distinct) for i in range(len(requests))
    ]


def _subject_runs(subjects: Sequence[str]) -> list[int]:
    return [j for j in range(len(subjects)) if j == 0 or subjects[j] != subjects[j - 1]]


def _neighbors_of(
    requests: Sequence[EditRequest],
    i: int,
    n: int,
    runs: list[int],
    run_of: list[int],
    excluded: set[str],
    distinct: int,
) -> list[str]:
    """The walk of :func:`neighbor_index` for request i, over runs of one subject."""
    total, me = len(requests), requests[i]
    want = min(n, distinct - len(excluded))
    out: list[str] = []
    seen: set[str] = set()
    j = i + 1
    while len(out) < want and j < i + total:
        subject = requests[j % total].subject
        if subject not in excluded and subject not in seen:
            seen.add(subject)
            out.append(me.prompt.format(subject))
        k = run_of[j % total] + 1  # jump to the next run (wrapping), never past position i + total
        nxt = runs[k] if k < len(runs) else total
        j = min(j + (nxt - j % total), i + total)
    return out


def requests_digest(requests: Sequence[EditRequest]) -> str:
    """A stable SHA-256 of the parsed requests (independent of file formatting)."""
    payload = json.dumps([r.to_dict() for r in requests], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()
