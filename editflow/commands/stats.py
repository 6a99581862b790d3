"""``editflow stats``: compute, list, verify, import and export cached layer statistics (C = E[k kᵀ])."""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import click

from editflow.commands._options import fail


def _corpus_options(f: Callable) -> Callable:
    """Options that describe the corpus (shared by ``compute`` and ``import``)."""
    options = [
        click.option(
            "--corpus",
            default="bundled",
            show_default=True,
            help="'bundled', a .txt/.jsonl/.parquet file, a directory (e.g. a local Wikipedia "
            "parquet copy) or a Hugging Face dataset name.",
        ),
        click.option("--config-name", default=None, help="Dataset config (e.g. 20231101.en)."),
        click.option("--split", default="train", show_default=True, help="Dataset split."),
        click.option("--revision", default=None, help="Dataset revision (pins hub datasets in the key)."),
        click.option("--data-files", multiple=True, help="Local data files for a hub/builder dataset (repeatable)."),
        click.option("--data-dir", default=None, help="data_dir passed to load_dataset."),
        click.option("--text-field", default="text", show_default=True, help="Field holding the document text."),
        click.option(
            "--txt-mode",
            type=click.Choice(["blocks", "lines"]),
            default="blocks",
            show_default=True,
            help=".txt files: one document per blank-line-separated block, or per line.",
        ),
    ]
    return functools.reduce(lambda acc, opt: opt(acc), reversed(options), f)


def _spec(
    corpus: str,
    config_name: str | None,
    split: str,
    revision: str | None,
    data_files: tuple[str, ...],
    data_dir: str | None,
    text_field: str,
    txt_mode: str,
):
    from editflow.stats import CorpusSpec

    return CorpusSpec(
        source=corpus,
        config=config_name,
        split=split,
        revision=revision,
        data_files=data_files,
        data_dir=data_dir,
        text_field=text_field,
        txt_mode=txt_mode,
    )


def _load(model: str, device: str | None, model_dtype: str | None):
    """``default``, ``models:/NAME@ALIAS``, ``models:/NAME/V``, a local path or a hub id."""
    from editflow.registry.resolve import load_any
    from editflow.registry.store import Registry

    return load_any(Registry(), model, device=device, dtype=model_dtype)


def _default_layers_and_tokens(handle, layers: str | None, tokens: int | None) -> tuple[list[int], int]:
    """Layers and budget as given, else what an edit of this model would use."""
    from editflow.config import default_config, parse_layers
    from editflow.registry.resolve import DEFAULT_STATS_TOKENS

    defaults = handle.extra.get("model_defaults", {})
    if layers:
        chosen = parse_layers(layers)
    else:
        a = handle.adapter
        chosen = list(default_config(a.model_type, a.n_layers, defaults.get("hparams", {})).layers)
    return chosen, int(tokens or defaults.get("stats_tokens") or DEFAULT_STATS_TOKENS)


cache_dir_option = click.option(
    "--cache-dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Statistics cache (default: $EDITFLOW_CACHE/stats or the user cache dir).",
)


@click.group("stats")
def command() -> None:
    """Layer statistics (C = E[k kᵀ] of the MLP keys) that MEMIT needs, cached on disk."""


@command.command("compute")
@click.argument("model")
@click.option("--layers", default=None, help="Edited layers, e.g. 3,4,5 or 3-8 (default: the model's edit layers).")
@click.option("--tokens", type=int, default=None, help="Token budget (default: the model's, else 1,000,000).")
@_corpus_options
@click.option("--max-length", type=int, default=None, help="Truncate documents (default min(context, 1024)).")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float64"]),
    default="float32",
    show_default=True,
    help="Accumulation dtype.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the corpus shuffle (part of the key).")
@click.option("--batch-tokens", type=int, default=8192, show_default=True, help="Padded tokens per batch.")
@click.option("--device", default=None, help="cuda / cpu (default: cuda when available).")
@click.option("--model-dtype", default=None, help="Load the model in float16/bfloat16/float32.")
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr.")
@cache_dir_option
def compute(
    model: str,
    layers: str | None,
    tokens: int | None,
    max_length: int | None,
    dtype: str,
    seed: int,
    batch_tokens: int,
    device: str | None,
    model_dtype: str | None,
    no_progress: bool,
    cache_dir: str | None,
    **corpus: object,
) -> None:
    """Compute (or reuse) the statistics of MODEL's --layers, all missing layers in one pass."""
    from editflow.stats import layer_covariances

    handle = _load(model, device, model_dtype)
    chosen, tokens = _default_layers_and_tokens(handle, layers, tokens)
    try:
        result = layer_covariances(
            handle,
            chosen,
            _spec(**corpus),
            tokens,  # type: ignore[arg-type]
            max_length=max_length,
            dtype=dtype,
            seed=seed,
            cache_dir=cache_dir,
            batch_tokens=batch_tokens,
            progress=not no_progress,
        )
    except ValueError as exc:  # CovarianceError, CacheError, bad layers/budget
        fail(str(exc))
    for entry in result.entries:
        state = "cached" if entry.hit else entry.manifest.get("source", "computed")
        click.echo(
            f"layer {entry.manifest['fields']['layer']:>3}  {state:<8}  {entry.manifest['tokens']:>10} tokens  "
            f"{entry.path}"
        )


@command.command("list")
@cache_dir_option
def list_(cache_dir: str | None) -> None:
    """List cached statistics."""
    from editflow.stats import cache_root, iter_entries
    from editflow.stats.corpus import describe

    root = cache_root(cache_dir)
    rows = []
    for npz in iter_entries(root):
        try:
            m = json.loads(npz.with_suffix(".json").read_text())
            f = m["fields"]
            rows.append(
                (
                    npz.stem[:12],
                    str(f["layer"]),
                    f["module"],
                    str(m["tokens"]),
                    f["stats_dtype"],
                    describe(f["corpus"]),
                    m.get("source", "?"),
                    m.get("created", "?"),
                )
            )
        except (OSError, ValueError, KeyError):
            rows.append((npz.stem[:12], "?", "?", "?", "?", "?", "invalid", "?"))
    if not rows:
        click.echo(f"no statistics under {root}")
        return
    header = ("KEY", "LAYER", "MODULE", "TOKENS", "DTYPE", "CORPUS", "SOURCE", "CREATED")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    click.echo(f"{len(rows)} entries under {root}")


@command.command("verify")
@cache_dir_option
def verify(cache_dir: str | None) -> None:
    """Check every cached file (manifest, key, checksum, contents); exit 1 if any is bad."""
    from editflow.stats import cache_root, check_entry, iter_entries

    root = cache_root(cache_dir)
    bad = 0
    entries = list(iter_entries(root))
    for npz in entries:
        problems, _ = check_entry(npz)
        bad += bool(problems)
        click.echo(f"OK   {npz}" if not problems else "BAD  " + "; ".join(problems))
    click.echo(f"{len(entries) - bad} ok, {bad} bad under {root}")
    if bad:
        raise SystemExit(1)


@command.command("import")
@click.argument("npz", type=click.Path(exists=True, dir_okay=False))
@click.option("--model", "model", required=True, help="The model the statistics belong to (path or HF id).")
@click.option("--layer", type=int, required=True, help="The layer the statistics belong to.")
@_corpus_options
@click.option("--tokens", type=int, default=None, help="Token budget recorded in the key (default: the file's count).")
@click.option(
    "--max-length", type=int, default=None, help="Document truncation recorded in the key (default min(context, 1024))."
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float64"]),
    default=None,
    help="Statistics dtype recorded in the key (default: the file's).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Corpus shuffle seed recorded in the key.")
@click.option("--model-dtype", default=None, help="Load the model in float16/bfloat16/float32.")
@cache_dir_option
def import_(
    npz: str,
    model: str,
    layer: int,
    tokens: int | None,
    max_length: int | None,
    dtype: str | None,
    seed: int,
    model_dtype: str | None,
    cache_dir: str | None,
    **corpus: object,
) -> None:
    """Add statistics computed elsewhere (editflow's or MEMIT's mom2.mom2/mom2.count layout) to the cache."""
    from editflow.hashing import file_sha256
    from editflow.stats import Sampling, cache_keys, cache_root, default_max_length, read_npz
    from editflow.stats.cache import write_entry
    from editflow.stats.moments import stats_dtype
    from editflow.stats.sanity import check_covariance

    try:
        stats, fmt = read_npz(npz)
        check_covariance(stats.mom2(), layer, f"{npz}, not imported")
    except ValueError as exc:  # StatsFileError, CovarianceError
        fail(str(exc))
    handle = _load(model, "cpu", model_dtype)
    if not 0 <= layer < handle.adapter.n_layers:
        fail(f"--layer {layer} is not a layer of this model (0..{handle.adapter.n_layers - 1})")
    if stats.dim != handle.adapter.d_ff:
        fail(f"{npz}: width {stats.dim} != the rewrite-module input width {handle.adapter.d_ff} of layer {layer}")
    dtype = dtype or str(stats.sum_kkT.dtype).removeprefix("torch.")
    key = cache_keys(
        handle,
        [layer],
        _spec(**corpus),
        tokens or stats.count,  # type: ignore[arg-type]
        max_length or default_max_length(handle.model, handle.tokenizer),
        dtype,
        Sampling(seed=seed),
    )[layer]
    info = {
        "source": "imported",
        "model": {"source": handle.source},
        "imported_from": {"file": Path(npz).name, "sha256": file_sha256(Path(npz)), "format": fmt},
    }
    try:
        entry = write_entry(cache_root(cache_dir), key, stats.to(dtype=stats_dtype(dtype)), info)
    except ValueError as exc:  # CacheError (read-only cache), CovarianceError after the dtype cast
        fail(str(exc))
    click.echo(f"imported {npz} ({fmt} layout, {stats.count} tokens) as {entry.path}")


@command.command("export")
@click.argument("key_or_path")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["editflow", "memit"]),
    default="editflow",
    show_default=True,
    help="editflow: sum/count arrays; memit: the public MEMIT code's mom2.mom2/mom2.count arrays.",
)
@cache_dir_option
def export(key_or_path: str, out_dir: str, fmt: str, cache_dir: str | None) -> None:
    """Copy one verified entry (by key, key prefix or path) and its manifest to OUT_DIR."""
    from editflow.stats import cache_root, check_entry, iter_entries, read_npz, write_npz

    path = Path(key_or_path)
    if path.exists():
        npz = path.with_suffix(".npz")
    else:
        matches = [p for p in iter_entries(cache_root(cache_dir)) if p.stem.startswith(key_or_path)]
        if len(matches) != 1:
            raise click.BadParameter(f"{len(matches)} entries match {key_or_path!r}", param_hint="KEY_OR_PATH")
        npz = matches[0]
    problems, _ = check_entry(npz)
    if problems:
        raise click.ClickException("; ".join(problems))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(npz.with_suffix(".json"), out / f"{npz.stem}.json")
    if fmt == "editflow":
        shutil.copy2(npz, out / npz.name)
    else:
        write_npz(out / npz.name, read_npz(npz)[0], fmt="memit")
    click.echo(f"exported {npz.stem[:12]} ({fmt}) to {out}")
