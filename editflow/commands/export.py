"""``editflow export NAME VERSION OUT``: a standalone copy of any version, as a Hugging Face
save_pretrained directory or as a GGUF file (for llama.cpp and Ollama)."""

from __future__ import annotations

import click

from editflow.commands._options import require_model, user_errors, version_ref


@click.command("export")
@click.argument("name")
@click.argument("version")
@click.argument("out", type=click.Path())
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["hf", "gguf"]),
    default="hf",
    show_default=True,
    help="hf: a save_pretrained directory (weights + tokenizer), loadable with plain transformers. "
    "gguf: one GGUF file (llama, mistral, qwen2; byte-level BPE tokenizers), loadable by "
    "llama.cpp, Ollama and transformers.",
)
@click.option(
    "--dtype",
    type=click.Choice(["f16", "f32"]),
    default="f16",
    show_default=True,
    help="GGUF only: the storage type of the weight matrices (norms stay f32). Quantised types "
    "are not written; quantise the file with llama.cpp's tools if you need them.",
)
@user_errors
def command(name: str, version: str, out: str, fmt: str, dtype: str) -> None:
    """Write VERSION (a number or an alias) of NAME to OUT: a new or empty directory (hf) or a
    .gguf file (gguf). A version whose root base came from a GGUF file keeps that file's tokenizer
    and general metadata."""
    from editflow.registry.store import Registry
    from editflow.registry.versions import export_gguf_version, export_version

    reg = Registry()
    require_model(reg, name)
    if fmt == "gguf":
        path = export_gguf_version(reg, name, version_ref(version), out, dtype=dtype)
    else:
        path = export_version(reg, name, version_ref(version), out)
    click.echo(f"exported {name} version {version} to {path}")
